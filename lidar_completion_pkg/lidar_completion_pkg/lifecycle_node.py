"""The managed (lifecycle) completion node, for stacks that bring nodes up in order.

    ros2 run lidar_completion_pkg lifecycle_completion_node --ros-args -p checkpoint:=student.pt
    ros2 lifecycle set /lidar_completion configure     # loads the checkpoint, completes a warm-up scan
    ros2 lifecycle set /lidar_completion activate      # subscribes and publishes

* ``configure``: load the checkpoint, complete one synthetic warm-up scan (graphs captured, kernels
  tuned), create the TF listener and the (lifecycle) publishers. A checkpoint that cannot be loaded
  fails the transition (the node stays unconfigured and says why).
* ``activate``: start the worker and subscribe to the input; /diagnostics says ``ready: true``.
* ``deactivate``: unsubscribe, cancel the scan in hand (at its next network pass; nothing of it is
  published), stop the worker and hand the accelerator's cached memory back (the model stays
  loaded: activate is immediate).
* ``cleanup``: also drop the model and the publishers (GPU memory freed); ``shutdown``: all of it.

/diagnostics (a plain publisher: it reports in every state) carries ``state`` and ``ready``.
Import this module after the Fast DDS environment is set (the console entry point does).
"""
from __future__ import annotations

from typing import Callable, Optional

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from .node import create_input, create_outputs, qos_summary, wall_clock, warn_unknown_parameters
from .parameters import NODE_NAME
from .pipeline import CompletionPipeline, StartupError, declare_parameters
from .stats import ACTIVE, FINALIZED, INACTIVE, UNCONFIGURED, WARMING_UP


class LifecycleCompletionNode(LifecycleNode):
    """The completion node as a managed node; ``completer_factory`` as in node.CompletionNode."""

    def __init__(self, completer_factory: Optional[Callable] = None, **node_kwargs):
        super().__init__(node_kwargs.pop("node_name", NODE_NAME), **node_kwargs)
        self.completer_factory = completer_factory
        self.finished = False    # set by the shutdown transition (finalized)
        self.config = declare_parameters(self)
        self.pipeline = CompletionPipeline(self, self.config, state=UNCONFIGURED)
        warn_unknown_parameters(self)
        self.sub = None
        self.diag_timer = self.create_timer(self.config["diagnostics_period"],
                                            self.pipeline.publish_diagnostics, clock=wall_clock())
        self.add_pre_set_parameters_callback(self.pipeline.pre_set_parameters)
        self.add_on_set_parameters_callback(self.pipeline.on_set_parameters)
        self.get_logger().info("unconfigured: configure loads the checkpoint and warms up, activate "
                               "subscribes")

    # -- transitions ------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.state = WARMING_UP
        try:
            self.pipeline.check_frames()
            # the executor is busy here: its diagnostics timer does not fire until configure ends
            with self.pipeline.heartbeat():
                self.pipeline.load(self.completer_factory)
                self.pipeline.warm_up()
            self.pipeline.open_frames()
        except StartupError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            self.pipeline.release(drop_model=True)     # back to the unconfigured state, nothing held
            self.pipeline.state = UNCONFIGURED
            return TransitionCallbackReturn.FAILURE
        create_outputs(self, self.pipeline, self.create_lifecycle_publisher)
        self.pipeline.state = INACTIVE
        self.pipeline.publish_diagnostics()
        self.get_logger().info(f"configured: {self.pipeline.describe()}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # activates the lifecycle publishers
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        self.pipeline.start()
        self.sub = create_input(self, self.pipeline)
        self.pipeline.state = ACTIVE
        self.pipeline.publish_diagnostics()
        self.get_logger().info(f"active: {self.pipeline.describe(self.sub.topic_name)}, "
                               f"{qos_summary(self.pipeline, self.sub)}")
        return TransitionCallbackReturn.SUCCESS

    def _unsubscribe(self) -> None:
        if self.sub is not None:
            self.destroy_subscription(self.sub)
            self.sub = None
        if not self.pipeline.stop(timeout=30.0):
            # its worker ends after that scan, publishing nothing; activate starts a new one
            self.get_logger().warning("the scan in progress did not end within 30 s")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unsubscribe()
        self.pipeline.release(drop_model=False)
        self.pipeline.state = INACTIVE
        self.pipeline.publish_diagnostics()
        self.get_logger().info("inactive: unsubscribed, worker stopped")
        return super().on_deactivate(state)

    def _drop_everything(self) -> None:
        self._unsubscribe()
        for pub in (self.pipeline.pub, self.pipeline.raw_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self.pipeline.pub = self.pipeline.raw_pub = None
        self.pipeline.close_frames()
        self.pipeline.release(drop_model=True)
        self.pipeline.state = UNCONFIGURED

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop_everything()
        self.pipeline.publish_diagnostics()
        self.get_logger().info("unconfigured: model released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Everything dropped and /diagnostics says ``finalized``; :attr:`finished` tells whoever
        spins the node that it can do nothing more (the entry point then exits with status 0, so a
        launch file or supervisor waiting for it sees it end; the context, which other nodes of the
        process may share, is left alone)."""
        self._drop_everything()
        self.pipeline.state = FINALIZED
        self.pipeline.publish_diagnostics()
        self.get_logger().info("finalized: exiting")
        self.finished = True
        return TransitionCallbackReturn.SUCCESS
