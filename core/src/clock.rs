//! Dots and version vectors: how replicas name changes and summarise what they hold.

use std::cmp::Ordering;

use rkyv::{Archive, Deserialize, Serialize};

use crate::ids::ReplicaId;

/// The name of one entry: the replica that made it and its per-database counter
/// (1, 2, 3, … without gaps).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Archive, Serialize, Deserialize,
)]
pub struct Dot {
    /// Who made the change.
    pub replica: ReplicaId,
    /// Its position in that replica's sequence for the database, starting at 1.
    pub counter: u64,
}

/// `replica -> highest contiguous counter held`. Missing replicas are 0.
///
/// Stored as a vector sorted by replica (compact on the wire, cheap to scan).
/// Invariant: sorted, no duplicate replicas, no zero counters, so equal
/// knowledge means equal vectors. Decoded vectors are re-established with
/// [`VersionVector::normalize`].
#[derive(Clone, PartialEq, Eq, Default, Debug, Archive, Serialize, Deserialize)]
pub struct VersionVector(Vec<(ReplicaId, u64)>);

impl VersionVector {
    /// The empty vector (knows nothing).
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, replica: &ReplicaId) -> Result<usize, usize> {
        self.0.binary_search_by(|(r, _)| r.cmp(replica))
    }

    /// Counter held for `replica` (0 when none).
    pub fn get(&self, replica: &ReplicaId) -> u64 {
        self.find(replica).map_or(0, |i| self.0[i].1)
    }

    /// Set the counter for `replica` (0 removes it).
    pub fn set(&mut self, replica: ReplicaId, counter: u64) {
        match (self.find(&replica), counter) {
            (Ok(i), 0) => {
                self.0.remove(i);
            }
            (Ok(i), c) => self.0[i].1 = c,
            (Err(_), 0) => {}
            (Err(i), c) => self.0.insert(i, (replica, c)),
        }
    }

    /// Whether the dot is covered.
    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.get(&dot.replica)
    }

    /// Raise every counter to at least `other`'s.
    pub fn merge(&mut self, other: &VersionVector) {
        for &(r, c) in &other.0 {
            if c > self.get(&r) {
                self.set(r, c);
            }
        }
    }

    /// Whether `self` holds everything `other` holds.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(r, c)| self.get(r) >= *c)
    }

    /// Partial order: `Some(Less)` when `self` is strictly behind `other`,
    /// `None` when they are concurrent.
    pub fn partial_cmp_vv(&self, other: &VersionVector) -> Option<Ordering> {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }

    /// Per-replica minimum (what both hold).
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut out = VersionVector::new();
        for (r, c) in &self.0 {
            out.set(*r, (*c).min(other.get(r)));
        }
        out
    }

    /// Iterate `(replica, counter)` in replica order.
    pub fn iter(&self) -> impl Iterator<Item = (&ReplicaId, &u64)> {
        self.0.iter().map(|(r, c)| (r, c))
    }

    /// Number of replicas with a non-zero counter.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no replica has a counter.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sum of all counters: the number of entries the vector covers.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, c)| c).sum()
    }

    /// Re-establish the invariant on a vector that came from an untrusted
    /// encoder: sort, keep the highest counter per replica, drop zeros.
    pub fn normalize(&mut self) {
        if self.0.windows(2).all(|w| w[0].0 < w[1].0) && self.0.iter().all(|(_, c)| *c > 0) {
            return;
        }
        let items = std::mem::take(&mut self.0);
        *self = items.into_iter().collect();
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (ReplicaId, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector::new();
        for (r, c) in iter {
            if c > vv.get(&r) {
                vv.set(r, c);
            }
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(n: u8) -> ReplicaId {
        ReplicaId([n; 16])
    }

    fn vv(pairs: &[(u8, u64)]) -> VersionVector {
        pairs.iter().map(|&(n, c)| (r(n), c)).collect()
    }

    #[test]
    fn compare_and_merge() {
        let a = vv(&[(1, 3), (2, 1)]);
        let b = vv(&[(1, 2), (2, 1)]);
        let c = vv(&[(3, 1)]);
        assert_eq!(a.partial_cmp_vv(&b), Some(Ordering::Greater));
        assert_eq!(b.partial_cmp_vv(&a), Some(Ordering::Less));
        assert_eq!(a.partial_cmp_vv(&c), None);
        let mut m = a.clone();
        m.merge(&c);
        assert!(m.dominates(&a) && m.dominates(&c));
        assert_eq!(m.total(), 5);
        assert_eq!(a.meet(&b), b);
        assert!(a.contains(&Dot {
            replica: r(1),
            counter: 3
        }));
        assert!(!a.contains(&Dot {
            replica: r(1),
            counter: 4
        }));
        let mut z = a.clone();
        z.set(r(1), 0);
        assert_eq!(z, vv(&[(2, 1)]));
    }

    fn arb_vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((0u8..5, 0u64..6), 0..6)
            .prop_map(|v| v.into_iter().map(|(n, c)| (r(n), c)).collect())
    }

    proptest! {
        #[test]
        fn merge_is_a_join(a in arb_vv(), b in arb_vv(), c in arb_vv()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            prop_assert!(ab.dominates(&a) && ab.dominates(&b));
            let mut abc = ab.clone(); abc.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(abc, a_bc);
            let mut aa = a.clone(); aa.merge(&a);
            prop_assert_eq!(aa, a.clone());
            prop_assert!(a.dominates(&a.meet(&b)));
        }
    }
}
