//! Drain-budget arithmetic for connection-draining rollouts; pure so it is easy to test.

/// Seconds added to the drain window before the kubelet kills a pod, so that the gateway can
/// close its last connections with code 1012 and flush its state.
pub const TERMINATION_MARGIN_SECONDS: i64 = 15;

/// How many pods may drain at once so that the clients they shed reconnect no faster than
/// `max_reconnects_per_second` across the fleet: each draining pod spreads its clients over
/// `drain_seconds`, so N pods cause about N × connections ÷ drain reconnects per second.
pub fn pods_draining_at_once(
    max_reconnects_per_second: i32,
    drain_seconds: i32,
    connections_per_pod: i64,
) -> i32 {
    let budget = i64::from(max_reconnects_per_second.max(0)) * i64::from(drain_seconds.max(0));
    let per_pod = connections_per_pod.max(1);
    let pods = budget / per_pod;
    i32::try_from(pods).unwrap_or(i32::MAX).max(1)
}

/// The pod's `terminationGracePeriodSeconds`: the drain window plus a margin.
pub fn termination_grace_seconds(drain_seconds: i32) -> i64 {
    i64::from(drain_seconds.max(0)) + TERMINATION_MARGIN_SECONDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_pods_drain_one_at_a_time_when_the_budget_is_small() {
        assert_eq!(pods_draining_at_once(500, 60, 10_000), 3);
        assert_eq!(pods_draining_at_once(100, 60, 10_000), 1);
    }

    #[test]
    fn at_least_one_pod_drains_even_with_a_zero_budget() {
        assert_eq!(pods_draining_at_once(1, 0, 10_000), 1);
        assert_eq!(pods_draining_at_once(0, 60, 10_000), 1);
    }

    #[test]
    fn empty_pods_do_not_divide_by_zero() {
        assert_eq!(pods_draining_at_once(500, 60, 0), 30_000);
    }

    #[test]
    fn grace_period_is_drain_window_plus_margin() {
        assert_eq!(termination_grace_seconds(60), 75);
        assert_eq!(termination_grace_seconds(-5), TERMINATION_MARGIN_SECONDS);
    }
}
