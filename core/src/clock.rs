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
    ///
    /// A linear merge of the two sorted lists, so a peer's large vector costs
    /// O(n + m) rather than one shifting insert per replica.
    pub fn merge(&mut self, other: &VersionVector) {
        if other.0.iter().all(|(r, c)| self.get(r) >= *c) {
            return;
        }
        let (a, b) = (&self.0, &other.0);
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                Ordering::Equal => {
                    out.push((a[i].0, a[i].1.max(b[j].1)));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        self.0 = out;
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

    /// A 16-byte name for this vector (SHA-256 over its replicas and
    /// counters, truncated): how a client names the pruned horizon it holds
    /// in `Subscribe::horizon` without sending it ([`crate::protocol::HORIZON_REPLICAS`]).
    /// Equal vectors have equal digests; distinct ones collide with
    /// probability 2^-128, and a client that forged one only misleads itself.
    pub fn digest(&self) -> [u8; 16] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"syncline-vv-v1");
        for (r, c) in &self.0 {
            h.update(r.0);
            h.update(c.to_le_bytes());
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        out
    }

    /// Re-establish the invariant on a vector that came from an untrusted
    /// encoder: sort, keep the highest counter per replica, drop zeros.
    ///
    /// O(n log n): a hostile peer may send hundreds of thousands of replicas
    /// in reverse order, and this runs before the peer has authenticated.
    pub fn normalize(&mut self) {
        if self.0.windows(2).all(|w| w[0].0 < w[1].0) && self.0.iter().all(|(_, c)| *c > 0) {
            return;
        }
        // Highest counter first within a replica, so dedup keeps it.
        self.0
            .sort_unstable_by(|x, y| x.0.cmp(&y.0).then_with(|| y.1.cmp(&x.1)));
        self.0.dedup_by_key(|(r, _)| *r);
        self.0.retain(|(_, c)| *c > 0);
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (ReplicaId, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector(iter.into_iter().collect());
        vv.normalize();
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

    #[test]
    fn normalize_keeps_the_highest_counter_and_drops_zeros() {
        let mut v = VersionVector(vec![(r(3), 1), (r(1), 2), (r(3), 4), (r(2), 0), (r(1), 1)]);
        v.normalize();
        assert_eq!(v.0, vec![(r(1), 2), (r(3), 4)]);
    }

    /// A hostile peer's reversed vector of 400,000 replicas (what fits in a
    /// 16 MiB frame): normalizing it used to cost one shifting insert per
    /// replica, minutes of CPU; now it is a sort.
    #[test]
    fn normalize_and_merge_handle_a_huge_reversed_vector() {
        let n: u32 = 400_000;
        let id = |i: u32| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            ReplicaId(b)
        };
        let mut v = VersionVector((0..n).rev().map(|i| (id(i), 1)).collect());
        v.normalize();
        assert_eq!(v.len(), n as usize);
        assert!(v.0.windows(2).all(|w| w[0].0 < w[1].0));
        let mut mine = vv(&[(7, 9)]);
        mine.merge(&v);
        assert_eq!(mine.len(), n as usize + 1);
        assert_eq!(mine.total(), u64::from(n) + 9);
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
            // The linear merge agrees with raising counters one by one.
            let mut slow = a.clone();
            for (r, c) in b.iter() {
                if *c > slow.get(r) {
                    slow.set(*r, *c);
                }
            }
            prop_assert_eq!(&ab, &slow);
        }
    }
}
