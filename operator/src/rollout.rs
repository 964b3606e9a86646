//! Drain-budget arithmetic for connection-draining rollouts and the deletion-cost policy; pure
//! so it is easy to test.

use std::time::Duration;

/// Seconds added to the drain window before the kubelet kills a pod. The grace period counts
/// from the start of the preStop hook, which returns when the drain is done (≈ drainSeconds);
/// the margin then covers the gateway's SIGTERM path (closing the last connections with 1012,
/// finishing in-flight sends, flushing) plus a few seconds of slack for a slow node, before
/// SIGKILL would cut connections the drain did not get to.
pub const TERMINATION_MARGIN_SECONDS: i64 = 15;

/// The Deployment's rolling-update parameters and the figure they were computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Connections per pod the budget assumed: the fullest pod's when counts are known.
    pub connections_per_pod: i64,
    /// `maxSurge`; `maxUnavailable` is always 0.
    pub pods_at_once: i32,
}

/// How many pods may drain at once so that the clients they shed reconnect no faster than
/// `max_reconnects_per_second` across the fleet: each draining pod spreads its clients over
/// `drain_seconds`, so N pods cause about N × connections ÷ drain reconnects per second.
///
/// At least one pod (a rollout must progress even when one pod alone exceeds the budget; the
/// drain then spreads its clients as thinly as the window allows), at most the fleet (a larger
/// surge buys nothing). Empty pods reconnect nobody, so they may all go at once.
pub fn pods_draining_at_once(
    max_reconnects_per_second: i32,
    drain_seconds: i32,
    connections_per_pod: i64,
    replicas: i32,
) -> i32 {
    let fleet = i64::from(replicas.max(1));
    let pods = if connections_per_pod <= 0 {
        fleet
    } else {
        // Both factors fit in i32, so the product fits in i64.
        let budget = i64::from(max_reconnects_per_second.max(0)) * i64::from(drain_seconds.max(0));
        (budget / connections_per_pod).min(fleet)
    };
    i32::try_from(pods).unwrap_or(i32::MAX).max(1)
}

/// The connections-per-pod figure for the budget: the fullest pod's, so that the budget holds
/// whichever pods the Deployment picks to drain together. `None` when no count is known.
pub fn connections_per_pod(known: impl IntoIterator<Item = i64>) -> Option<i64> {
    known.into_iter().map(|c| c.max(0)).max()
}

/// The rollout plan: observed connections per pod, or `assumed_when_unknown` (a full pod) while
/// no pod has reported, so an unobserved fleet rolls as slowly as a full one.
pub fn plan(
    max_reconnects_per_second: i32,
    drain_seconds: i32,
    observed_connections_per_pod: Option<i64>,
    assumed_when_unknown: i64,
    replicas: i32,
) -> Plan {
    let connections_per_pod = observed_connections_per_pod
        .unwrap_or(assumed_when_unknown)
        .max(0);
    Plan {
        connections_per_pod,
        pods_at_once: pods_draining_at_once(
            max_reconnects_per_second,
            drain_seconds,
            connections_per_pod,
            replicas,
        ),
    }
}

/// The pod's `terminationGracePeriodSeconds`: the drain window plus a margin.
pub fn termination_grace_seconds(drain_seconds: i32) -> i64 {
    i64::from(drain_seconds.max(0)) + TERMINATION_MARGIN_SECONDS
}

/// A pod's deletion cost is patched at most this often, whatever its connections do: the cost
/// only matters at the next scale-down, and each patch is a write to the API server.
pub const DELETION_COST_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// A change of at least this many connections is worth a patch even when under 10 %.
pub const DELETION_COST_MIN_CHANGE: i64 = 100;

/// `controller.kubernetes.io/pod-deletion-cost` for a pod with this many connections (the
/// annotation is an int32).
pub fn deletion_cost(connections: i64) -> i32 {
    i32::try_from(connections.max(0)).unwrap_or(i32::MAX)
}

/// The cost to write to a pod now, if a patch is due: the pod has none (or an unreadable one),
/// or its connections moved by more than 10 % or by at least [`DELETION_COST_MIN_CHANGE`] — and
/// in any case not within [`DELETION_COST_MIN_INTERVAL`] of the last patch.
pub fn deletion_cost_due(
    current: Option<i32>,
    connections: i64,
    since_last_patch: Option<Duration>,
) -> Option<i32> {
    if since_last_patch.is_some_and(|since| since < DELETION_COST_MIN_INTERVAL) {
        return None;
    }
    let wanted = deletion_cost(connections);
    let Some(current) = current else {
        return Some(wanted);
    };
    let change = (i64::from(wanted) - i64::from(current)).abs();
    let relative = change * 10 > i64::from(current).abs();
    (change > 0 && (relative || change >= DELETION_COST_MIN_CHANGE)).then_some(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_pods_drain_one_at_a_time_when_the_budget_is_small() {
        assert_eq!(pods_draining_at_once(500, 60, 10_000, 10), 3);
        assert_eq!(pods_draining_at_once(100, 60, 10_000, 10), 1);
        // Rounds down: 2.99 pods would overshoot the budget.
        assert_eq!(pods_draining_at_once(500, 60, 10_001, 10), 2);
    }

    #[test]
    fn one_pod_drains_even_when_it_alone_exceeds_the_budget() {
        assert_eq!(pods_draining_at_once(10, 10, 1_000_000, 10), 1);
    }

    #[test]
    fn at_least_one_pod_drains_even_with_a_zero_budget() {
        assert_eq!(pods_draining_at_once(1, 0, 10_000, 10), 1);
        assert_eq!(pods_draining_at_once(0, 60, 10_000, 10), 1);
        assert_eq!(pods_draining_at_once(-5, -5, 10_000, 10), 1);
    }

    #[test]
    fn empty_pods_may_all_go_at_once_without_dividing_by_zero() {
        assert_eq!(pods_draining_at_once(500, 60, 0, 7), 7);
        assert_eq!(pods_draining_at_once(500, 0, 0, 7), 7);
        assert_eq!(pods_draining_at_once(500, 60, -3, 7), 7);
    }

    #[test]
    fn the_surge_never_exceeds_the_fleet() {
        assert_eq!(pods_draining_at_once(500, 60, 1_000, 4), 4);
        assert_eq!(pods_draining_at_once(500, 60, 1_000, 0), 1);
    }

    #[test]
    fn huge_numbers_neither_overflow_nor_wrap() {
        assert_eq!(
            pods_draining_at_once(i32::MAX, i32::MAX, 1, i32::MAX),
            i32::MAX
        );
        assert_eq!(pods_draining_at_once(i32::MAX, 3600, i64::MAX, 1000), 1);
        assert_eq!(pods_draining_at_once(i32::MAX, 3600, 1, 1000), 1000);
    }

    #[test]
    fn the_fullest_pod_sets_the_figure() {
        assert_eq!(connections_per_pod([10, 4_000, 250]), Some(4_000));
        assert_eq!(connections_per_pod([]), None);
        assert_eq!(connections_per_pod([-4]), Some(0));
    }

    #[test]
    fn an_unobserved_fleet_is_planned_as_a_full_one() {
        assert_eq!(
            plan(500, 60, None, 10_000, 10),
            Plan {
                connections_per_pod: 10_000,
                pods_at_once: 3
            }
        );
        assert_eq!(
            plan(500, 60, Some(1_000), 10_000, 10),
            Plan {
                connections_per_pod: 1_000,
                pods_at_once: 10
            }
        );
        assert_eq!(plan(500, 60, Some(0), 10_000, 10).pods_at_once, 10);
    }

    #[test]
    fn grace_period_is_drain_window_plus_margin() {
        assert_eq!(termination_grace_seconds(60), 75);
        assert_eq!(termination_grace_seconds(0), TERMINATION_MARGIN_SECONDS);
        assert_eq!(termination_grace_seconds(-5), TERMINATION_MARGIN_SECONDS);
    }

    #[test]
    fn deletion_cost_is_the_connection_count_clamped_to_int32() {
        assert_eq!(deletion_cost(1234), 1234);
        assert_eq!(deletion_cost(-1), 0);
        assert_eq!(deletion_cost(i64::MAX), i32::MAX);
    }

    #[test]
    fn a_pod_without_a_cost_gets_one_at_once() {
        assert_eq!(deletion_cost_due(None, 0, None), Some(0));
        assert_eq!(deletion_cost_due(None, 5_000, None), Some(5_000));
    }

    #[test]
    fn small_moves_are_not_worth_a_patch() {
        // 5 % of 1 000 and fewer than 100 connections.
        assert_eq!(deletion_cost_due(Some(1_000), 1_050, None), None);
        assert_eq!(deletion_cost_due(Some(1_000), 1_000, None), None);
        // Exactly 10 % is not more than 10 %.
        assert_eq!(deletion_cost_due(Some(500), 550, None), None);
    }

    #[test]
    fn moves_over_ten_percent_or_a_hundred_connections_are_patched() {
        assert_eq!(deletion_cost_due(Some(500), 551, None), Some(551));
        assert_eq!(deletion_cost_due(Some(500), 420, None), Some(420));
        // 1 % of 10 000, but 100 connections.
        assert_eq!(deletion_cost_due(Some(10_000), 9_900, None), Some(9_900));
        assert_eq!(deletion_cost_due(Some(10_000), 9_901, None), None);
        assert_eq!(deletion_cost_due(Some(0), 1, None), Some(1));
        assert_eq!(deletion_cost_due(Some(3), 0, None), Some(0));
    }

    #[test]
    fn no_pod_is_patched_twice_within_the_interval() {
        let soon = Some(DELETION_COST_MIN_INTERVAL - Duration::from_millis(1));
        assert_eq!(deletion_cost_due(Some(0), 9_000, soon), None);
        assert_eq!(deletion_cost_due(None, 9_000, soon), None);
        assert_eq!(
            deletion_cost_due(Some(0), 9_000, Some(DELETION_COST_MIN_INTERVAL)),
            Some(9_000)
        );
    }

    #[test]
    fn a_cost_someone_else_set_out_of_range_is_corrected() {
        assert_eq!(deletion_cost_due(Some(-2_000), 10, None), Some(10));
        assert_eq!(deletion_cost_due(Some(i32::MIN), 0, None), Some(0));
    }
}
