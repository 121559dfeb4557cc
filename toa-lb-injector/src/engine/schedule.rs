//! Picking a backend for a new flow.

use std::hash::BuildHasher;
use std::net::SocketAddr;

use crate::engine::config::{Backend, Scheduler};

/// A listener's scheduler state.
#[derive(Debug)]
pub(crate) struct Picker {
    scheduler: Scheduler,
    next: usize,
    /// Smooth weighted round robin: the current weight of each backend.
    current: Vec<i64>,
}

impl Picker {
    pub(crate) fn new(scheduler: Scheduler, backends: usize) -> Self {
        Picker { scheduler, next: 0, current: vec![0; backends] }
    }

    /// Follows a change of the backend list (added at the end, or removed at `removed`).
    pub(crate) fn resize(&mut self, backends: usize, removed: Option<usize>) {
        if let Some(i) = removed {
            if i < self.current.len() {
                self.current.remove(i);
            }
        }
        self.current.resize(backends, 0);
    }

    /// The index of the backend for a new flow from `client`, among those
    /// for which `up(index)` holds; `None` when none does.
    pub(crate) fn pick(
        &mut self,
        backends: &[Backend],
        up: impl Fn(usize) -> bool,
        client: SocketAddr,
    ) -> Option<usize> {
        if !(0..backends.len()).any(&up) {
            return None;
        }
        Some(match self.scheduler {
            Scheduler::RoundRobin => loop {
                let i = self.next % backends.len();
                self.next = self.next.wrapping_add(1);
                if up(i) {
                    break i;
                }
            },
            Scheduler::WeightedRoundRobin => {
                // nginx's smooth WRR over the backends that are up: add each weight,
                // take the largest, subtract the total.
                let total: i64 =
                    (0..backends.len()).filter(|i| up(*i)).map(|i| i64::from(backends[i].weight)).sum();
                let mut best = None;
                for (i, backend) in backends.iter().enumerate().filter(|(i, _)| up(*i)) {
                    self.current[i] += i64::from(backend.weight);
                    if best.is_none_or(|b: usize| self.current[i] > self.current[b]) {
                        best = Some(i);
                    }
                }
                let best = best.unwrap_or(0);
                self.current[best] -= total;
                best
            }
            Scheduler::ConsistentHash => rendezvous(client, backends, up).unwrap_or(0),
        })
    }
}

/// Rendezvous hashing: among the backends for which `eligible(index)` holds,
/// the one with the highest hash of `(key, backend)`. Removing a backend moves
/// only the keys it had. A fixed-key hasher: a key maps to the same backend
/// after a restart. (The kernel datapath hashes bucket numbers with it.)
pub(crate) fn rendezvous(
    key: impl std::hash::Hash + Copy,
    backends: &[Backend],
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let score = |b: &Backend| {
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one((key, b.addr))
    };
    (0..backends.len()).filter(|i| eligible(*i)).max_by_key(|&i| score(&backends[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend { addr: format!("192.0.2.{}:80", i + 10).parse().unwrap(), weight })
            .collect()
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let b = backends(&[1, 1, 1]);
        let mut p = Picker::new(Scheduler::RoundRobin, 3);
        let all = [true; 3];
        let picks: Vec<usize> =
            (0..6).map(|_| p.pick(&b, |i| all[i], "203.0.113.1:1".parse().unwrap()).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // A backend marked down gets nothing; none up, no pick.
        let picks: Vec<usize> = (0..4)
            .map(|_| p.pick(&b, |i| [true, false, true][i], "203.0.113.1:1".parse().unwrap()).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(p.pick(&b, |_| false, "203.0.113.1:1".parse().unwrap()), None);
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let b = backends(&[5, 1, 1]);
        let mut p = Picker::new(Scheduler::WeightedRoundRobin, 3);
        let all = [true; 3];
        let picks: Vec<usize> =
            (0..7).map(|_| p.pick(&b, |i| all[i], "203.0.113.1:1".parse().unwrap()).unwrap()).collect();
        // nginx's example: a a b a c a a
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn consistent_hash_keeps_clients_and_moves_few() {
        let b = backends(&[1, 1, 1, 1]);
        let mut p = Picker::new(Scheduler::ConsistentHash, 4);
        let clients: Vec<SocketAddr> =
            (0..400).map(|i| format!("203.0.113.{}:{}", i % 250, 1000 + i).parse().unwrap()).collect();
        let all = [true; 4];
        let before: Vec<usize> = clients.iter().map(|c| p.pick(&b, |i| all[i], *c).unwrap()).collect();
        assert_eq!(
            before,
            clients.iter().map(|c| p.pick(&b, |i| all[i], *c).unwrap()).collect::<Vec<_>>(),
            "stable"
        );
        let used: std::collections::HashSet<_> = before.iter().collect();
        assert_eq!(used.len(), 4, "every backend gets clients");
        // Backend 3 down: only its clients move.
        for (c, old) in clients.iter().zip(&before) {
            let new = p.pick(&b, |i| i != 3, *c).unwrap();
            if *old != 3 {
                assert_eq!(new, *old);
            }
        }
    }
}
