"""QoS profiles of the node: keep last, volatile, with the reliability and depth of each topic.

The input defaults to best effort (sensor-data QoS, as LiDAR drivers publish; a best-effort subscription
also receives from reliable publishers), the outputs to reliable (what rviz and most subscribers ask
for by default; a reliable publisher serves best-effort subscribers too). Each endpoint is created with
``qos_overriding_options`` so that ``qos_overrides.<topic>.<publisher|subscription>.<policy>``
(reliability, history, depth, durability)
parameters (rclpy's standard mechanism) override these defaults at start-up.
"""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos import QoSPolicyKind
from rclpy.qos_overriding_options import QoSOverridingOptions

RELIABILITIES = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}


def cloud_qos(reliability: str = "best_effort", depth: int = 5) -> QoSProfile:
    """Keep-last, volatile QoS with the given reliability and depth (best_effort, 5 = sensor data)."""
    try:
        policy = RELIABILITIES[reliability]
    except KeyError:
        raise ValueError(f"reliability must be one of {sorted(RELIABILITIES)}, "
                         f"found {reliability!r}") from None
    if int(depth) < 1:
        raise ValueError(f"QoS depth must be >= 1, found {depth}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), reliability=policy,
                      durability=DurabilityPolicy.VOLATILE)


def overridable() -> QoSOverridingOptions:
    """qos_overrides.<topic>.* parameters for reliability, history, depth and durability
    (``transient_local`` on an output keeps the last completion for subscribers that come later,
    an rviz opened after the node)."""
    return QoSOverridingOptions(policy_kinds=(QoSPolicyKind.RELIABILITY, QoSPolicyKind.HISTORY,
                                              QoSPolicyKind.DEPTH, QoSPolicyKind.DURABILITY))


def describe(qos: QoSProfile) -> str:
    """'reliable/5' style summary of a profile."""
    return f"{qos.reliability.name.lower()}/{qos.depth}"
