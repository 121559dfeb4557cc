//! Picking a backend for a new flow.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use crate::config::{Backend, Scheduler};

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

    /// The index of the backend for a new flow from `client`.
    pub(crate) fn pick(&mut self, backends: &[Backend], client: SocketAddr) -> usize {
        match self.scheduler {
            Scheduler::RoundRobin => {
                let i = self.next % backends.len();
                self.next = self.next.wrapping_add(1);
                i
            }
            Scheduler::WeightedRoundRobin => {
                // nginx's smooth WRR: add each weight, take the largest, subtract the total.
                let total: i64 = backends.iter().map(|b| i64::from(b.weight)).sum();
                let mut best = 0;
                for (i, backend) in backends.iter().enumerate() {
                    self.current[i] += i64::from(backend.weight);
                    if self.current[i] > self.current[best] {
                        best = i;
                    }
                }
                self.current[best] -= total;
                best
            }
            Scheduler::ConsistentHash => {
                // Rendezvous hashing: the backend with the highest hash of (client, backend).
                let score = |b: &Backend| {
                    let mut h =
                        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                            .build_hasher();
                    h.write(client.to_string().as_bytes());
                    h.write(b.addr.to_string().as_bytes());
                    h.finish()
                };
                (0..backends.len()).max_by_key(|&i| score(&backends[i])).unwrap_or(0)
            }
        }
    }
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
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&b, "203.0.113.1:1".parse().unwrap())).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let b = backends(&[5, 1, 1]);
        let mut p = Picker::new(Scheduler::WeightedRoundRobin, 3);
        let picks: Vec<usize> = (0..7).map(|_| p.pick(&b, "203.0.113.1:1".parse().unwrap())).collect();
        // nginx's example: a a b a c a a
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn consistent_hash_keeps_clients_and_moves_few() {
        let b = backends(&[1, 1, 1, 1]);
        let mut p = Picker::new(Scheduler::ConsistentHash, 4);
        let clients: Vec<SocketAddr> =
            (0..400).map(|i| format!("203.0.113.{}:{}", i % 250, 1000 + i).parse().unwrap()).collect();
        let before: Vec<usize> = clients.iter().map(|c| p.pick(&b, *c)).collect();
        assert_eq!(before, clients.iter().map(|c| p.pick(&b, *c)).collect::<Vec<_>>(), "stable");
        let used: std::collections::HashSet<_> = before.iter().collect();
        assert_eq!(used.len(), 4, "every backend gets clients");
        // Remove backend 3: only its clients move.
        let fewer = &b[..3];
        for (c, old) in clients.iter().zip(&before) {
            let new = p.pick(fewer, *c);
            if *old != 3 {
                assert_eq!(new, *old);
            }
        }
    }
}
