"""Kernel-launch counter shared by every Triton launcher of this package.

Fusion is the point of the package, so tests assert it by counting: each launcher calls :func:`record` once
per Triton kernel it launches. Under ``torch.compile`` the launchers run once while tracing, so the counter
counts traced launches there, not executed ones.
"""

_count = 0


def record(n: int = 1) -> None:
    """Count ``n`` kernel launches."""
    global _count
    _count += n


def launch_count() -> int:
    """Kernel launches recorded since the last :func:`reset_launch_count`."""
    return _count


def reset_launch_count() -> None:
    """Set the launch counter back to zero."""
    global _count
    _count = 0
