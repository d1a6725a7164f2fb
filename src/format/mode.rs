//! The mode extension: this crate's own header extension, type `0x44424D44` ("DBMD"),
//! which records how the image's bitmaps are kept by their writer.
//!
//! A reader cannot tell that from the bitmaps themselves: the durable mode
//! (`BitmapStore::activate_durable`, `src/store/durable.rs`) never sets `in_use`, and
//! neither does a store that is not active. So the durable activation writes this
//! extension with bit 0 set, and the deferred activation (which sets `in_use` while active)
//! first writes its flags word to 0 in place (cluster 0 is rewritten only to drop a
//! malformed extension). Byte table and crash reasoning: `docs/FORMAT.md`, "Mode extension
//! data", and `docs/CRASH-CONSISTENCY.md`, "The mode extension".
//!
//! The qcow2 specification lets a writer add extensions of its own: readers ignore unknown
//! types, and QEMU keeps them byte for byte when it rewrites the header
//! (`qcow2_read_extensions` saves them in `unknown_header_ext`, `qcow2_update_header`
//! writes them back; `tests/qemu_interop.rs` checks it with `qemu-img`).
//!
//! The data is 8 bytes, a big-endian u64 of flags:
//!
//! | bit | meaning |
//! |---|---|
//! | 0 | the bitmaps of this image are (or were last) kept in durable mode |
//! | 1..=63 | reserved: a reader that finds one set reports the mode as unknown |
//!
//! Decoding never fails on the flags: reserved bits are kept for the caller to see. Only a
//! length other than 8 is an error ([`Corruption::ExtensionLength`]); the extension walk
//! ([`decode_extensions`](super::decode_extensions)) then keeps the extension byte for byte
//! as an unknown one rather than refusing the image, since the mode is advice and QEMU
//! opens such an image.

use super::bytes::{be_u64, put_u64};
use super::corruption::Corruption;

/// The mode extension's type code: the ASCII bytes "DBMD".
pub const EXT_MODE: u32 = 0x4442_4D44;
/// The mode extension's data length.
pub const MODE_EXT_LEN: usize = 8;
/// Flag bit 0: the bitmaps of this image are kept in durable mode.
pub const MODE_DURABLE: u64 = 1;
/// Every flag bit this crate does not know.
pub const MODE_RESERVED: u64 = !MODE_DURABLE;

/// The decoded mode extension: its flags, reserved bits included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeExtension {
    /// The flags word, as found (bit 0: durable; the others reserved).
    pub flags: u64,
}

impl ModeExtension {
    /// What the durable activation writes: bit 0 set, every reserved bit clear.
    pub const DURABLE: Self = Self {
        flags: MODE_DURABLE,
    };

    /// Decodes the data of the extension whose frame starts at `frame_offset`.
    ///
    /// # Errors
    /// [`Corruption::ExtensionLength`] unless `data` is exactly 8 bytes. Reserved bits are
    /// not an error.
    pub fn decode(data: &[u8], frame_offset: u64) -> Result<Self, Corruption> {
        match (data.len(), be_u64(data, 0)) {
            (MODE_EXT_LEN, Some(flags)) => Ok(Self { flags }),
            _ => Err(Corruption::ExtensionLength {
                offset: frame_offset,
                kind: EXT_MODE,
                len: u32::try_from(data.len()).unwrap_or(u32::MAX),
                expected: "exactly 8",
            }),
        }
    }

    /// The 8 data bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MODE_EXT_LEN);
        put_u64(&mut out, self.flags);
        out
    }

    /// Whether bit 0 (durable) is set. Meaningful only when [`reserved`](Self::reserved) is
    /// 0: with a reserved bit set the mode is unknown, whatever bit 0 says.
    pub fn durable(&self) -> bool {
        self.flags & MODE_DURABLE != 0
    }

    /// The reserved bits that are set (0 for every extension this crate writes).
    pub fn reserved(&self) -> u64 {
        self.flags & MODE_RESERVED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_code_spells_dbmd() {
        assert_eq!(EXT_MODE.to_be_bytes(), *b"DBMD");
    }

    #[test]
    fn durable_round_trips_as_eight_big_endian_bytes() {
        let data = ModeExtension::DURABLE.encode();
        assert_eq!(data, [0, 0, 0, 0, 0, 0, 0, 1]);
        let back = ModeExtension::decode(&data, 0x218).unwrap();
        assert_eq!(back, ModeExtension::DURABLE);
        assert!(back.durable());
        assert_eq!(back.reserved(), 0);
    }

    #[test]
    fn every_flags_word_round_trips_and_reserved_bits_are_kept() {
        for flags in [0, 1, 2, 3, 1 << 63, u64::MAX, 0x0123_4567_89ab_cdef] {
            let m = ModeExtension { flags };
            let back = ModeExtension::decode(&m.encode(), 0).unwrap();
            assert_eq!(back, m);
            assert_eq!(back.reserved(), flags & !1);
            assert_eq!(back.durable(), flags & 1 == 1);
        }
        assert_eq!(
            ModeExtension::decode(&[0x80, 0, 0, 0, 0, 0, 0, 0], 0)
                .unwrap()
                .reserved(),
            1 << 63
        );
    }

    #[test]
    fn a_length_other_than_8_is_a_typed_error() {
        for len in [0usize, 1, 7, 9, 16, 4096] {
            let data = vec![0xff; len];
            assert_eq!(
                ModeExtension::decode(&data, 0x218),
                Err(Corruption::ExtensionLength {
                    offset: 0x218,
                    kind: EXT_MODE,
                    len: len as u32,
                    expected: "exactly 8",
                }),
                "{len} bytes"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::test_seed::proptest_config(proptest::test_runner::Config::default()))]

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..32)) {
            let r = ModeExtension::decode(&data, 0);
            proptest::prop_assert_eq!(r.is_ok(), data.len() == 8);
            if let Ok(m) = r {
                proptest::prop_assert_eq!(m.encode(), data);
            }
        }
    }
}
