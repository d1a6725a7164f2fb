//! The framing of the header extension area: type codes, the 8-byte frame, and the walk
//! `qcow2_read_extensions` makes. The extensions themselves are decoded in
//! [`extension`](super::extension); the feature name table in [`feature`](super::feature).

use super::bytes::{be_u32, pad8, put_u32, round_up8, slice, to_u64, to_usize, truncated};
use super::corruption::{invalid_input, Corruption, InvalidValue};

/// Type 0: end of the extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// Backing file format name (string, no NUL).
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer (LUKS).
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_BE77;
/// External data file name (string, no NUL).
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The frame before every extension's data: u32 type, u32 length.
pub const EXTENSION_FRAME_LEN: usize = 8;

// Field offsets inside an extension frame.
const OFF_EXT_TYPE: usize = 0;
const OFF_EXT_LEN: usize = 4;

/// Appends one framed extension (QEMU's `header_ext_add`).
pub(crate) fn frame_into(out: &mut Vec<u8>, kind: u32, data: &[u8]) -> Result<(), InvalidValue> {
    let len = u32::try_from(data.len())
        .map_err(|_| invalid_input!("extension data of {} bytes is too long", data.len()))?;
    put_u32(out, kind);
    put_u32(out, len);
    out.extend_from_slice(data);
    pad8(out);
    Ok(())
}

/// One framed extension found in the area.
pub(crate) struct Frame<'a> {
    pub(crate) offset: u64,
    pub(crate) kind: u32,
    pub(crate) data: &'a [u8],
}

/// Walks the frames of the extension area `[start, end)` of `bytes` the way
/// `qcow2_read_extensions` does. `Ok(None)` means the end marker or the end of the area.
pub(crate) struct Frames<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) offset: u64,
    pub(crate) end: u64,
}

impl<'a> Frames<'a> {
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame<'a>>, Corruption> {
        if self.offset >= self.end {
            return Ok(None);
        }
        let at = to_usize(self.offset);
        let avail = to_u64(self.bytes.len());
        let short = || {
            truncated(
                "header extension",
                self.offset,
                8,
                avail.saturating_sub(self.offset),
            )
        };
        let kind = be_u32(self.bytes, at.saturating_add(OFF_EXT_TYPE)).ok_or_else(short)?;
        let len = be_u32(self.bytes, at.saturating_add(OFF_EXT_LEN)).ok_or_else(short)?;
        let data_start = self.offset.saturating_add(to_u64(EXTENSION_FRAME_LEN));
        let room = self.end.checked_sub(data_start);
        match room {
            Some(room) if u64::from(len) <= room => {}
            _ => {
                return Err(Corruption::ExtensionTooLarge {
                    offset: self.offset,
                    len,
                    room: room.unwrap_or(0),
                })
            }
        }
        if kind == EXT_END {
            self.offset = self.end;
            return Ok(None);
        }
        let data =
            slice(self.bytes, to_usize(data_start), to_usize(u64::from(len))).ok_or_else(|| {
                truncated(
                    "header extension",
                    self.offset,
                    u64::from(len).saturating_add(8),
                    avail.saturating_sub(self.offset),
                )
            })?;
        let frame = Frame {
            offset: self.offset,
            kind,
            data,
        };
        // Padding past the end of the area simply ends the walk, as in QEMU.
        self.offset = round_up8(u64::from(len))
            .and_then(|l| data_start.checked_add(l))
            .unwrap_or(u64::MAX);
        Ok(Some(frame))
    }
}
