//! The gateway's waiting room: strict priority between phases (critical, performance,
//! specialized), round-robin between callers within a phase, first-in first-out within a caller.
//! A plain data structure owned by the dispatcher task; every operation is O(1) or O(callers).

use mesh_config::Phase;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A queued request's handle, unique for the gateway's life.
pub type Id = u64;

/// Requests waiting for a slot. Round-robin by request is deficit round-robin with a quantum of
/// one request: generation cost is unknown until it ends, so every request costs the same.
#[derive(Debug)]
pub struct FairQueue<T> {
    phases: [PhaseQueue<T>; 3],
    index: HashMap<Id, (Phase, Arc<str>)>,
}

#[derive(Debug)]
struct PhaseQueue<T> {
    /// Callers with waiting requests, in turn order; each appears once.
    turn: VecDeque<Arc<str>>,
    waiting: HashMap<Arc<str>, VecDeque<(Id, T)>>,
    len: usize,
}

/// Bounds checked on push.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub phase: usize,
    pub caller: usize,
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The phase's queue holds `Bounds::phase` requests.
    Phase { len: usize },
    /// The caller already has `Bounds::caller` requests queued: its own quota.
    Caller { len: usize },
}

/// The request that gets the next slot.
#[derive(Debug, PartialEq, Eq)]
pub struct Popped<T> {
    pub id: Id,
    pub phase: Phase,
    pub item: T,
}

// === impl FairQueue ===

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            phases: [PhaseQueue::new(), PhaseQueue::new(), PhaseQueue::new()],
            index: HashMap::new(),
        }
    }
}

impl<T> FairQueue<T> {
    /// Queues `item` behind the caller's earlier requests; returns its 1-based position.
    pub fn push(
        &mut self,
        phase: Phase,
        caller: &Arc<str>,
        id: Id,
        item: T,
        bounds: Bounds,
    ) -> Result<usize, (Full, T)> {
        let q = &mut self.phases[phase as usize];
        if q.len >= bounds.phase {
            return Err((Full::Phase { len: q.len }, item));
        }
        let mine = match q.waiting.get_mut(caller) {
            Some(mine) => mine,
            None => {
                q.turn.push_back(caller.clone());
                q.waiting.entry(caller.clone()).or_default()
            }
        };
        if mine.len() >= bounds.caller {
            let len = mine.len();
            if mine.is_empty() {
                q.forget(caller);
            }
            return Err((Full::Caller { len }, item));
        }
        mine.push_back((id, item));
        q.len += 1;
        self.index.insert(id, (phase, caller.clone()));
        Ok(self.position(id).unwrap_or(0))
    }

    /// Takes the next request: the first phase with waiting requests, the caller whose turn it
    /// is, that caller's oldest request.
    pub fn pop(&mut self) -> Option<Popped<T>> {
        for phase in Phase::ALL {
            let q = &mut self.phases[phase as usize];
            let Some(caller) = q.turn.pop_front() else {
                continue;
            };
            let mine = q
                .waiting
                .get_mut(&caller)
                .expect("a caller in turn has requests");
            let (id, item) = mine.pop_front().expect("a caller in turn has requests");
            q.len -= 1;
            if mine.is_empty() {
                q.waiting.remove(&caller);
            } else {
                q.turn.push_back(caller);
            }
            self.index.remove(&id);
            return Some(Popped { id, phase, item });
        }
        None
    }

    /// Takes a request out wherever it is (its caller left or gave up); returns it with the
    /// position it had.
    pub fn remove(&mut self, id: Id) -> Option<(T, usize)> {
        let position = self.position(id)?;
        let (phase, caller) = self.index.remove(&id)?;
        let q = &mut self.phases[phase as usize];
        let mine = q.waiting.get_mut(&caller)?;
        let at = mine.iter().position(|(i, _)| *i == id)?;
        let (_, item) = mine.remove(at)?;
        q.len -= 1;
        if mine.is_empty() {
            q.forget(&caller);
        }
        Some((item, position))
    }

    /// The queued request `id`, to update what it carries.
    pub fn get_mut(&mut self, id: Id) -> Option<&mut T> {
        let (phase, caller) = self.index.get(&id)?;
        let mine = self.phases[*phase as usize].waiting.get_mut(caller)?;
        mine.iter_mut()
            .find(|(i, _)| *i == id)
            .map(|(_, item)| item)
    }

    /// How many requests will be served before this one, plus one, if nothing else arrives.
    pub fn position(&self, id: Id) -> Option<usize> {
        let (phase, caller) = self.index.get(&id)?;
        let ahead_phases: usize = Phase::ALL
            .iter()
            .take_while(|p| *p != phase)
            .map(|p| self.phases[*p as usize].len)
            .sum();
        let q = &self.phases[*phase as usize];
        let mine = q.waiting.get(caller)?;
        // Served in round `k` of the phase's round-robin; earlier rounds take up to `k` from
        // every other caller, and this round takes one from each caller ahead in turn order.
        let k = mine.iter().position(|(i, _)| *i == id)?;
        let mut ahead = k;
        let mut before_me = true;
        for other in &q.turn {
            if other == caller {
                before_me = false;
                continue;
            }
            let len = q.waiting.get(other).map_or(0, VecDeque::len);
            ahead += len.min(k) + usize::from(before_me && len > k);
        }
        Some(ahead_phases + ahead + 1)
    }

    pub fn len(&self, phase: Phase) -> usize {
        self.phases[phase as usize].len
    }

    pub fn total(&self) -> usize {
        self.phases.iter().map(|q| q.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// Empties the queue, highest phase first.
    pub fn drain(&mut self) -> Vec<Popped<T>> {
        let mut out = Vec::with_capacity(self.total());
        while let Some(p) = self.pop() {
            out.push(p);
        }
        out
    }
}

// === impl PhaseQueue ===

impl<T> PhaseQueue<T> {
    fn new() -> Self {
        Self {
            turn: VecDeque::new(),
            waiting: HashMap::new(),
            len: 0,
        }
    }

    fn forget(&mut self, caller: &Arc<str>) {
        self.waiting.remove(caller);
        if let Some(at) = self.turn.iter().position(|c| c == caller) {
            self.turn.remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    const ROOMY: Bounds = Bounds {
        phase: 1000,
        caller: 1000,
    };

    fn name(s: &str) -> Arc<str> {
        s.into()
    }

    fn order(q: &mut FairQueue<&'static str>) -> Vec<&'static str> {
        q.drain().into_iter().map(|p| p.item).collect()
    }

    #[test]
    fn higher_phase_first_whatever_the_arrival_order() {
        let mut q = FairQueue::default();
        q.push(Specialized, &name("s"), 1, "s1", ROOMY).unwrap();
        q.push(Performance, &name("p"), 2, "p1", ROOMY).unwrap();
        q.push(Critical, &name("c"), 3, "c1", ROOMY).unwrap();
        q.push(Specialized, &name("s"), 4, "s2", ROOMY).unwrap();
        q.push(Critical, &name("c"), 5, "c2", ROOMY).unwrap();
        assert_eq!(order(&mut q), ["c1", "c2", "p1", "s1", "s2"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_burst_does_not_push_another_caller_back_more_than_one_turn() {
        let mut q = FairQueue::default();
        let burst = ["b1", "b2", "b3", "b4", "b5"];
        for (i, item) in burst.into_iter().enumerate() {
            q.push(Specialized, &name("bursty"), i as Id, item, ROOMY)
                .unwrap();
        }
        // The quiet agent arrives after the whole burst and is served second.
        q.push(Specialized, &name("quiet"), 10, "q1", ROOMY)
            .unwrap();
        q.push(Specialized, &name("quiet"), 11, "q2", ROOMY)
            .unwrap();
        assert_eq!(order(&mut q), ["b1", "q1", "b2", "q2", "b3", "b4", "b5"]);
    }

    #[test]
    fn a_caller_that_arrives_mid_round_waits_at_most_one_request_per_caller() {
        let mut q = FairQueue::default();
        for i in 0..3 {
            q.push(Specialized, &name("a"), i, "a", ROOMY).unwrap();
            q.push(Specialized, &name("b"), 10 + i, "b", ROOMY).unwrap();
        }
        assert_eq!(q.pop().unwrap().item, "a");
        q.push(Specialized, &name("c"), 20, "c", ROOMY).unwrap();
        // Turn order is now b, a, c: c waits for one b and one a.
        assert_eq!(order(&mut q), ["b", "a", "c", "b", "a", "b"]);
    }

    #[test]
    fn position_predicts_the_serving_order() {
        let mut q = FairQueue::default();
        let mut ids = Vec::new();
        let mut n = 0;
        for (phase, caller, count) in [
            (Specialized, "s1", 4),
            (Specialized, "s2", 2),
            (Critical, "c1", 2),
            (Performance, "p1", 1),
            (Specialized, "s3", 3),
        ] {
            for _ in 0..count {
                n += 1;
                q.push(phase, &name(caller), n, n, ROOMY).unwrap();
                ids.push(n);
            }
        }
        let predicted: HashMap<Id, usize> = ids
            .iter()
            .map(|&id| (id, q.position(id).unwrap()))
            .collect();
        let served: Vec<Id> = q.drain().into_iter().map(|p| p.id).collect();
        for (at, id) in served.iter().enumerate() {
            assert_eq!(predicted[id], at + 1, "request {id}");
        }
    }

    #[test]
    fn removed_requests_are_never_served() {
        let mut q = FairQueue::default();
        q.push(Critical, &name("a"), 1, "a1", ROOMY).unwrap();
        q.push(Critical, &name("b"), 2, "b1", ROOMY).unwrap();
        q.push(Critical, &name("a"), 3, "a2", ROOMY).unwrap();
        assert_eq!(q.remove(2), Some(("b1", 2)));
        assert_eq!(q.remove(2), None);
        assert_eq!(q.len(Critical), 2);
        assert_eq!(order(&mut q), ["a1", "a2"]);
    }

    #[test]
    fn a_caller_removed_entirely_loses_its_turn_slot() {
        let mut q = FairQueue::default();
        q.push(Critical, &name("a"), 1, "a1", ROOMY).unwrap();
        q.push(Critical, &name("b"), 2, "b1", ROOMY).unwrap();
        q.remove(1).unwrap();
        q.push(Critical, &name("a"), 3, "a2", ROOMY).unwrap();
        // a left and came back: it is now behind b.
        assert_eq!(order(&mut q), ["b1", "a2"]);
    }

    #[test]
    fn bounds_are_per_phase_and_per_caller() {
        let mut q = FairQueue::default();
        let tight = Bounds {
            phase: 3,
            caller: 2,
        };
        q.push(Performance, &name("a"), 1, "a1", tight).unwrap();
        q.push(Performance, &name("a"), 2, "a2", tight).unwrap();
        assert_eq!(
            q.push(Performance, &name("a"), 3, "a3", tight),
            Err((Full::Caller { len: 2 }, "a3"))
        );
        q.push(Performance, &name("b"), 4, "b1", tight).unwrap();
        assert_eq!(
            q.push(Performance, &name("c"), 5, "c1", tight),
            Err((Full::Phase { len: 3 }, "c1"))
        );
        // Another phase has its own room, and a refused caller left no trace.
        q.push(Critical, &name("c"), 6, "c1", tight).unwrap();
        assert_eq!(order(&mut q), ["c1", "a1", "b1", "a2"]);
    }
}
