"""ROS 2 layer of the project: the completion node (the only code importing rclpy)."""
