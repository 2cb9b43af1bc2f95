//! The guest address map: port ranges and MMIO ranges, each owned by one handler.
//!
//! Ranges live in a Vec sorted by base so that the per-exit look-up is one binary
//! search; inserts and removals are rare (device set-up).

use std::fmt;
use std::sync::RwLock;

/// A half-open range [base, base + length) and what answers for it.
#[derive(Debug, Clone)]
pub struct Range<T> {
    pub base: u64,
    pub length: u64,
    pub handler: T,
}

impl<T> Range<T> {
    /// The last address (inclusive): `base + length` may be 2^64 for MMIO.
    fn last(&self) -> u64 {
        self.base + (self.length - 1)
    }
}

/// Why a range could not be added or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapError {
    Empty,
    OutOfSpace {
        base: u64,
        length: u64,
        limit: u64,
    },
    Overlap {
        base: u64,
        length: u64,
        existing_base: u64,
        existing_length: u64,
    },
    NotFound {
        base: u64,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "a range needs a length of at least 1"),
            Self::OutOfSpace {
                base,
                length,
                limit,
            } => write!(
                f,
                "range {base:#x}+{length:#x} does not fit in an address space of {limit:#x}"
            ),
            Self::Overlap {
                base,
                length,
                existing_base,
                existing_length,
            } => write!(
                f,
                "range {base:#x}+{length:#x} overlaps {existing_base:#x}+{existing_length:#x}"
            ),
            Self::NotFound { base } => write!(f, "no range starts at {base:#x}"),
        }
    }
}

/// Non-overlapping ranges in one address space of `limit` addresses.
#[derive(Debug, Clone)]
pub struct RangeMap<T> {
    ranges: Vec<Range<T>>,
    limit: u128,
}

impl<T> RangeMap<T> {
    /// An empty map of an address space with `limit` addresses (2^16 for ports).
    pub fn new(limit: u128) -> Self {
        Self {
            ranges: Vec::new(),
            limit,
        }
    }

    pub fn insert(&mut self, base: u64, length: u64, handler: T) -> Result<(), MapError> {
        if length == 0 {
            return Err(MapError::Empty);
        }
        if u128::from(base) + u128::from(length) > self.limit {
            return Err(MapError::OutOfSpace {
                base,
                length,
                limit: u64::try_from(self.limit).unwrap_or(u64::MAX),
            });
        }
        let index = self.ranges.partition_point(|range| range.base < base);
        let neighbours = [index.checked_sub(1), Some(index)];
        for existing in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.ranges.get(i))
        {
            if base <= existing.last() && existing.base <= base + (length - 1) {
                return Err(MapError::Overlap {
                    base,
                    length,
                    existing_base: existing.base,
                    existing_length: existing.length,
                });
            }
        }
        self.ranges.insert(
            index,
            Range {
                base,
                length,
                handler,
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, base: u64) -> Result<Range<T>, MapError> {
        match self.ranges.binary_search_by_key(&base, |range| range.base) {
            Ok(index) => Ok(self.ranges.remove(index)),
            Err(_) => Err(MapError::NotFound { base }),
        }
    }

    /// The range containing `address`, if any.
    #[inline]
    pub fn lookup(&self, address: u64) -> Option<&Range<T>> {
        let index = self.ranges.partition_point(|range| range.base <= address);
        let range = self.ranges.get(index.checked_sub(1)?)?;
        (address <= range.last()).then_some(range)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range<T>> {
        self.ranges.iter()
    }

    /// Removes every range and hands them back.
    pub fn take_all(&mut self) -> Vec<Range<T>> {
        std::mem::take(&mut self.ranges)
    }
}

/// Ports in a 16-bit space.
pub const PIO_SPACE: u128 = 1 << 16;
/// Guest-physical addresses in a 64-bit space.
pub const MMIO_SPACE: u128 = 1 << 64;

/// The two address spaces a vCPU exit can name, each behind its own lock: the run loop
/// holds a read lock only for one look-up.
#[derive(Debug)]
pub struct AddressMap<T> {
    pub pio: RwLock<RangeMap<T>>,
    pub mmio: RwLock<RangeMap<T>>,
}

impl<T> Default for AddressMap<T> {
    fn default() -> Self {
        Self {
            pio: RwLock::new(RangeMap::new(PIO_SPACE)),
            mmio: RwLock::new(RangeMap::new(MMIO_SPACE)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(ranges: &[(u64, u64)]) -> RangeMap<usize> {
        let mut map = RangeMap::new(PIO_SPACE);
        for (id, &(base, length)) in ranges.iter().enumerate() {
            map.insert(base, length, id).unwrap();
        }
        map
    }

    #[test]
    fn lookup_finds_the_covering_range_only() {
        let map = map_of(&[(0x3f8, 8), (0x20, 2), (0x40, 4)]);
        assert_eq!(map.lookup(0x3f8).map(|r| r.handler), Some(0));
        assert_eq!(map.lookup(0x3ff).map(|r| r.handler), Some(0));
        assert!(map.lookup(0x400).is_none());
        assert_eq!(map.lookup(0x21).map(|r| r.handler), Some(1));
        assert!(map.lookup(0x22).is_none());
        assert!(map.lookup(0x1f).is_none());
        assert_eq!(map.lookup(0x43).map(|r| r.handler), Some(2));
        assert!(map.lookup(0).is_none());
        assert!(map.lookup(u64::MAX).is_none());
    }

    #[test]
    fn ranges_stay_sorted_whatever_the_insert_order() {
        let map = map_of(&[(0x70, 2), (0x20, 2), (0x60, 1), (0xa0, 2)]);
        let bases: Vec<u64> = map.iter().map(|r| r.base).collect();
        assert_eq!(bases, vec![0x20, 0x60, 0x70, 0xa0]);
    }

    #[test]
    fn overlaps_are_refused_on_both_sides() {
        let mut map = map_of(&[(0x40, 4), (0x60, 4)]);
        for (base, length) in [(0x3f, 2), (0x43, 1), (0x44, 0x1d), (0x30, 0x100), (0x41, 1)] {
            assert!(
                matches!(map.insert(base, length, 9), Err(MapError::Overlap { .. })),
                "{base:#x}+{length:#x} should overlap"
            );
        }
        // Touching ranges do not overlap.
        map.insert(0x44, 0x1c, 7).unwrap();
        map.insert(0x3c, 4, 8).unwrap();
        assert_eq!(map.lookup(0x5f).map(|r| r.handler), Some(7));
        assert_eq!(map.lookup(0x3f).map(|r| r.handler), Some(8));
    }

    #[test]
    fn empty_and_out_of_space_ranges_are_refused() {
        let mut map = RangeMap::new(PIO_SPACE);
        assert_eq!(map.insert(0x10, 0, ()), Err(MapError::Empty));
        assert!(matches!(
            map.insert(0xfffe, 3, ()),
            Err(MapError::OutOfSpace { .. })
        ));
        map.insert(0xfffe, 2, ()).unwrap();
        let mut mmio = RangeMap::new(MMIO_SPACE);
        mmio.insert(u64::MAX, 1, ()).unwrap();
        assert!(matches!(
            mmio.insert(u64::MAX - 1, 2, ()),
            Err(MapError::Overlap { .. })
        ));
        assert!(matches!(
            mmio.insert(u64::MAX - 1, 3, ()),
            Err(MapError::OutOfSpace { .. })
        ));
    }

    #[test]
    fn remove_needs_the_exact_base() {
        let mut map = map_of(&[(0x40, 4)]);
        assert_eq!(
            map.remove(0x41).unwrap_err(),
            MapError::NotFound { base: 0x41 }
        );
        assert_eq!(map.remove(0x40).unwrap().handler, 0);
        assert!(map.lookup(0x40).is_none());
        map.insert(0x40, 4, 5).unwrap();
    }

    #[test]
    fn the_last_address_of_each_space_can_be_owned_and_found() {
        let mut ports = RangeMap::new(PIO_SPACE);
        ports.insert(0xfff0, 0x10, 1).unwrap();
        assert_eq!(ports.lookup(0xffff).map(|r| r.handler), Some(1));
        assert!(ports.lookup(0x1_0000).is_none());
        let mut mmio = RangeMap::new(MMIO_SPACE);
        // A range reaching 2^64 (its end is not a u64) and one at address 0.
        mmio.insert(u64::MAX - 0xfff, 0x1000, 2).unwrap();
        mmio.insert(0, 1, 3).unwrap();
        assert_eq!(mmio.lookup(u64::MAX).map(|r| r.handler), Some(2));
        assert_eq!(mmio.lookup(u64::MAX - 0xfff).map(|r| r.handler), Some(2));
        assert!(mmio.lookup(u64::MAX - 0x1000).is_none());
        assert_eq!(mmio.lookup(0).map(|r| r.handler), Some(3));
        assert!(mmio.lookup(1).is_none());
    }

    #[test]
    fn a_range_covering_several_others_is_refused() {
        let mut map = map_of(&[(0x40, 2), (0x50, 2), (0x60, 2)]);
        assert_eq!(
            map.insert(0x3f, 0x30, 9),
            Err(MapError::Overlap {
                base: 0x3f,
                length: 0x30,
                existing_base: 0x40,
                existing_length: 2,
            })
        );
        assert_eq!(map.iter().count(), 3);
    }

    #[test]
    fn removal_frees_exactly_its_range() {
        let mut map = map_of(&[(0x40, 4), (0x44, 4), (0x48, 4)]);
        assert_eq!(map.remove(0x44).unwrap().length, 4);
        assert!(map.lookup(0x44).is_none());
        assert!(map.lookup(0x47).is_none());
        assert_eq!(map.lookup(0x43).map(|r| r.handler), Some(0));
        assert_eq!(map.lookup(0x48).map(|r| r.handler), Some(2));
        // The gap takes a range of its size again, not one byte more.
        assert!(matches!(
            map.insert(0x44, 5, 7),
            Err(MapError::Overlap { .. })
        ));
        map.insert(0x44, 4, 7).unwrap();
        assert_eq!(map.lookup(0x46).map(|r| r.handler), Some(7));
        assert_eq!(map.remove(0x44).unwrap().handler, 7);
        assert!(map.remove(0x44).is_err(), "a range is removed once");
    }

    #[test]
    fn take_all_hands_back_every_range_and_leaves_the_map_empty() {
        let mut map = map_of(&[(0x60, 1), (0x20, 2)]);
        let taken: Vec<(u64, usize)> = map
            .take_all()
            .into_iter()
            .map(|r| (r.base, r.handler))
            .collect();
        assert_eq!(taken, vec![(0x20, 1), (0x60, 0)]);
        assert!(map.lookup(0x20).is_none());
        map.insert(0x20, 0x50, 5).unwrap();
    }
}
