//! The guest cluster map (L1 and L2 tables) of an image whose guest data is a raw external
//! data file: every guest cluster maps to the same offset of the data file, as
//! `qemu-img create -o data_file=RAW,data_file_raw=on,preallocation=metadata` writes it.
//!
//! Byte tables: `docs/FORMAT.md`, "Raw data files". An L1 entry is the L2 table's offset
//! with bit 63 (`COPIED`: refcount 1) set; an L2 entry is the guest offset itself with bit
//! 63 set. With an external data file, offset 0 with `COPIED` set is the data file's first
//! cluster, not an unallocated one (QEMU's `qcow2_get_cluster_type`). Entries past the
//! disk's last cluster are 0 (unallocated).

use super::corruption::{invalid_input, InvalidValue};
use super::header::check_cluster_bits;

/// L1 and L2 entries: bit 63, the cluster's refcount is exactly one.
pub const ENTRY_COPIED: u64 = 1 << 63;
/// L1 and L2 entries: bits 9-55, the offset.
pub const ENTRY_OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;

/// The shape of a raw data file's guest map: how many L2 tables, of how many entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawGuestMap {
    /// Bytes per cluster (of the image and of the guest).
    pub cluster_size: u64,
    /// The virtual disk size in bytes.
    pub disk_size: u64,
}

impl RawGuestMap {
    /// The map of a disk of `disk_size` bytes with clusters of `cluster_size` bytes.
    ///
    /// # Errors
    /// [`InvalidValue`] for a cluster size that is not a power of two in 512..=2 MiB.
    pub fn new(cluster_size: u64, disk_size: u64) -> Result<Self, InvalidValue> {
        if !cluster_size.is_power_of_two() {
            return Err(invalid_input!(
                "cluster size {cluster_size} is not a power of two"
            ));
        }
        check_cluster_bits(cluster_size.trailing_zeros())
            .map_err(|e| invalid_input!("cluster size {cluster_size}: {e}"))?;
        Ok(Self {
            cluster_size,
            disk_size,
        })
    }

    /// Entries per L2 table (standard, 8-byte entries).
    pub fn entries_per_l2(&self) -> u64 {
        self.cluster_size / 8
    }

    /// Guest clusters (the last one may be partial).
    pub fn guest_clusters(&self) -> u64 {
        self.disk_size.div_ceil(self.cluster_size)
    }

    /// L2 tables, which is also the L1 table's size in entries.
    pub fn l2_tables(&self) -> u64 {
        self.guest_clusters().div_ceil(self.entries_per_l2())
    }

    /// The L1 table's entries when the L2 tables are contiguous from byte offset
    /// `l2_offset` of the image (big-endian bytes, `8 × l2_tables()` of them).
    ///
    /// # Errors
    /// [`InvalidValue`] for an `l2_offset` that is not cluster-aligned, or tables that
    /// would end past the 56-bit offsets an entry holds.
    pub fn encode_l1(&self, l2_offset: u64) -> Result<Vec<u8>, InvalidValue> {
        let n = self.l2_tables();
        if n.checked_mul(self.cluster_size)
            .and_then(|len| l2_offset.checked_add(len))
            .is_none_or(|e| e > ENTRY_OFFSET_MASK.saturating_add(1))
        {
            return Err(invalid_input!("L2 tables at {l2_offset:#x} end past 2^56"));
        }
        if !l2_offset.is_multiple_of(self.cluster_size) || l2_offset == 0 {
            return Err(invalid_input!(
                "L2 tables at {l2_offset:#x}: not a non-zero multiple of the cluster size"
            ));
        }
        let mut out = Vec::with_capacity(usize::try_from(n.saturating_mul(8)).unwrap_or(0));
        for t in 0..n {
            let off = l2_offset.saturating_add(t.saturating_mul(self.cluster_size));
            out.extend_from_slice(&(off | ENTRY_COPIED).to_be_bytes());
        }
        Ok(out)
    }

    /// Fills `out` (whole L2 tables, `cluster_size` bytes each) with L2 tables
    /// `first_table..`: entry `j` of table `t` maps guest cluster `t × entries_per_l2() + j`
    /// to the same offset of the data file, or is 0 past the disk's last cluster.
    ///
    /// # Errors
    /// [`InvalidValue`] if `out` is not a whole number of tables, or names tables past
    /// [`l2_tables`](Self::l2_tables).
    pub fn fill_l2(&self, first_table: u64, out: &mut [u8]) -> Result<(), InvalidValue> {
        let cs = usize::try_from(self.cluster_size)
            .map_err(|_| invalid_input!("cluster size {} too large", self.cluster_size))?;
        if !out.len().is_multiple_of(cs) {
            return Err(invalid_input!(
                "{} bytes are not whole L2 tables of {cs} bytes",
                out.len()
            ));
        }
        let tables = out.len().checked_div(cs).unwrap_or(0) as u64;
        if first_table
            .checked_add(tables)
            .is_none_or(|e| e > self.l2_tables())
        {
            return Err(invalid_input!(
                "L2 tables {first_table}..+{tables} past the {} the disk has",
                self.l2_tables()
            ));
        }
        let clusters = self.guest_clusters();
        let first = first_table.saturating_mul(self.entries_per_l2());
        for (k, e) in out.chunks_exact_mut(8).enumerate() {
            let g = first.saturating_add(k as u64);
            let v = if g < clusters {
                g.saturating_mul(self.cluster_size) | ENTRY_COPIED
            } else {
                0
            };
            e.copy_from_slice(&v.to_be_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(b: &[u8], i: usize) -> u64 {
        u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn the_map_of_a_100_mib_disk_matches_qemu_img() {
        // qemu-img create -f qcow2 -o data_file=raw.img,data_file_raw=on,
        // preallocation=metadata q.qcow2 100M: L1 at 0x30000 with one entry
        // 0x8000000000040000; L2 entries 0x8000000000000000, ...010000, ...020000,
        // entry 1599 0x80000000063f0000, entry 1600 and on 0.
        let m = RawGuestMap::new(65536, 100 << 20).unwrap();
        assert_eq!(m.l2_tables(), 1);
        assert_eq!(m.encode_l1(0x40000).unwrap(), 0x8000_0000_0004_0000u64.to_be_bytes());
        let mut l2 = vec![0xffu8; 65536];
        m.fill_l2(0, &mut l2).unwrap();
        assert_eq!(be(&l2, 0), 0x8000_0000_0000_0000);
        assert_eq!(be(&l2, 1), 0x8000_0000_0001_0000);
        assert_eq!(be(&l2, 2), 0x8000_0000_0002_0000);
        assert_eq!(be(&l2, 1599), 0x8000_0000_063f_0000);
        assert!((1600..8192).all(|i| be(&l2, i) == 0));
    }

    #[test]
    fn tables_past_the_first_continue_the_guest_offsets() {
        let m = RawGuestMap::new(512, 512 * 64 * 2 + 512).unwrap();
        // 64 entries per table, 129 clusters: 3 tables, the last with one entry.
        assert_eq!((m.entries_per_l2(), m.guest_clusters(), m.l2_tables()), (64, 129, 3));
        let mut t = vec![0u8; 1024];
        m.fill_l2(1, &mut t).unwrap();
        assert_eq!(be(&t, 0), (64 * 512) | ENTRY_COPIED);
        assert_eq!(be(&t, 64), (128 * 512) | ENTRY_COPIED);
        assert_eq!(be(&t, 65), 0);
        let l1 = m.encode_l1(4096).unwrap();
        assert_eq!(l1.len(), 24);
        assert_eq!(be(&l1, 2), (4096 + 1024) | ENTRY_COPIED);
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(RawGuestMap::new(1000, 1 << 20).is_err());
        assert!(RawGuestMap::new(256, 1 << 20).is_err());
        assert!(RawGuestMap::new(4 << 20, 1 << 20).is_err());
        let m = RawGuestMap::new(65536, 1 << 30).unwrap();
        assert!(m.fill_l2(0, &mut [0u8; 100]).is_err());
        assert_eq!(m.l2_tables(), 2);
        assert!(m.fill_l2(1, &mut vec![0u8; 65536]).is_ok());
        assert!(m.fill_l2(2, &mut vec![0u8; 65536]).is_err());
        assert!(m.fill_l2(1, &mut vec![0u8; 2 * 65536]).is_err());
        assert!(m.encode_l1(100).is_err());
        assert!(m.encode_l1(0).is_err());
        assert!(m.encode_l1(u64::MAX - 65535).is_err());
    }
}
