//! Page sources: where a missing guest page comes from.
//!
//! The fault layer asks a [`PageSource`] for a page once the [`link::LinkModel`] says
//! it has arrived. Sources: zeros, a raw memory image; the boot image (guest ELF,
//! boot info, page tables) lies over either as an [`Overlay`]. On a migration
//! destination the source is [`remote::Remote`]: the migration source process.

pub mod link;
pub mod remote;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::abi::PAGE_SIZE;

/// Errors of page sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The image file cannot be opened or measured.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The image does not match guest RAM.
    #[error("image {path} is {got} bytes but guest RAM (--mem) is {want} bytes; they must match")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        got: u64,
        /// RAM size.
        want: u64,
    },
    /// Reading a page failed: the page is lost.
    #[error("cannot read page {idx} from the source: {source}")]
    Read {
        /// Page index.
        idx: usize,
        /// The error.
        source: std::io::Error,
    },
}

/// What a source produced for a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData {
    /// All zeros (the buffer was not written).
    Zero,
    /// The buffer holds the page.
    Bytes,
}

/// Something that can produce guest pages by index. A page is `buf.len()` bytes, the
/// RAM page size (4 KiB, or 2 MiB with `--hugepages`), and `idx` counts in that unit.
pub trait PageSource: Send {
    /// Fills `buf` (one page) with page `idx`, or says it is all zeros.
    fn read_page(&mut self, idx: usize, buf: &mut [u8]) -> Result<PageData, SourceError>;
}

/// Every page is zero.
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn read_page(&mut self, _idx: usize, _buf: &mut [u8]) -> Result<PageData, SourceError> {
        Ok(PageData::Zero)
    }
}

/// Pages from a raw memory image file (as written by `--dump-memory`).
pub struct ImageSource {
    file: File,
}

impl ImageSource {
    /// Opens `path`, which must be exactly `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Checked before open: opening a FIFO would block.
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(std::io::Error::other("not a regular file")));
        }
        let file = File::open(path).map_err(open_err)?;
        let got = file.metadata().map_err(open_err)?.len();
        if got != size {
            return Err(SourceError::Size {
                path: path.to_path_buf(),
                got,
                want: size,
            });
        }
        Ok(ImageSource { file })
    }
}

impl PageSource for ImageSource {
    fn read_page(&mut self, idx: usize, buf: &mut [u8]) -> Result<PageData, SourceError> {
        self.file
            .read_exact_at(buf, idx as u64 * buf.len() as u64)
            .map_err(|source| SourceError::Read { idx, source })?;
        Ok(if buf.iter().all(|&b| b == 0) {
            PageData::Zero
        } else {
            PageData::Bytes
        })
    }
}

/// A set of whole 4 KiB pages (the boot image) lying over another source; a larger
/// page is the base's bytes with the overlay's 4 KiB pieces in it.
pub struct Overlay {
    pages: BTreeMap<usize, Box<[u8]>>,
    base: Box<dyn PageSource>,
}

impl Overlay {
    /// `pages` (4 KiB index -> 4 KiB of bytes) over `base`.
    pub fn new(pages: BTreeMap<usize, Box<[u8]>>, base: Box<dyn PageSource>) -> Self {
        Overlay { pages, base }
    }
}

impl PageSource for Overlay {
    fn read_page(&mut self, idx: usize, buf: &mut [u8]) -> Result<PageData, SourceError> {
        let small = PAGE_SIZE as usize;
        if buf.len() == small {
            return match self.pages.get(&idx) {
                Some(p) => {
                    buf.copy_from_slice(p);
                    Ok(PageData::Bytes)
                }
                None => self.base.read_page(idx, buf),
            };
        }
        // A huge page: the base's page, then the boot pieces that lie in it.
        let per = buf.len() / small;
        let first = idx * per;
        let mut pieces = self.pages.range(first..first + per).peekable();
        if pieces.peek().is_none() {
            return self.base.read_page(idx, buf);
        }
        if self.base.read_page(idx, buf)? == PageData::Zero {
            buf.fill(0);
        }
        for (&i, p) in pieces {
            let at = (i - first) * small;
            buf[at..at + small].copy_from_slice(p);
        }
        Ok(PageData::Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn image_must_match_ram_and_reads_pages() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 3 * PAGE_SIZE as usize];
        data[PAGE_SIZE as usize + 5] = 42;
        f.write_all(&data).unwrap();
        assert!(matches!(
            ImageSource::open(f.path(), 4 * PAGE_SIZE),
            Err(SourceError::Size { .. })
        ));
        let mut img = ImageSource::open(f.path(), 3 * PAGE_SIZE).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        assert_eq!(img.read_page(0, &mut buf).unwrap(), PageData::Zero);
        assert_eq!(img.read_page(1, &mut buf).unwrap(), PageData::Bytes);
        assert_eq!(buf[5], 42);
        assert!(img.read_page(3, &mut buf).is_err());
    }

    #[test]
    fn overlay_wins_over_base() {
        let mut pages = BTreeMap::new();
        pages.insert(2usize, vec![7u8; PAGE_SIZE as usize].into_boxed_slice());
        let mut o = Overlay::new(pages, Box::new(ZeroSource));
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        assert_eq!(o.read_page(1, &mut buf).unwrap(), PageData::Zero);
        assert_eq!(o.read_page(2, &mut buf).unwrap(), PageData::Bytes);
        assert_eq!(buf[100], 7);
    }

    #[test]
    fn a_huge_page_is_the_base_with_the_boot_pieces_in_it() {
        let huge = 2usize << 20;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 2 * huge];
        data[huge + 9] = 5;
        f.write_all(&data).unwrap();
        let mut pages = BTreeMap::new();
        // 4 KiB page 513 lies in huge page 1, at 4 KiB into it.
        pages.insert(513usize, vec![7u8; PAGE_SIZE as usize].into_boxed_slice());
        let base = ImageSource::open(f.path(), 2 * huge as u64).unwrap();
        let mut o = Overlay::new(pages, Box::new(base));
        let mut buf = vec![1u8; huge];
        assert_eq!(o.read_page(0, &mut buf).unwrap(), PageData::Zero);
        assert_eq!(o.read_page(1, &mut buf).unwrap(), PageData::Bytes);
        assert_eq!(
            (buf[9], buf[4095], buf[4096], buf[8191], buf[8192]),
            (5, 0, 7, 7, 0)
        );
        let mut zero = Overlay::new(
            [(513usize, vec![7u8; PAGE_SIZE as usize].into_boxed_slice())].into(),
            Box::new(ZeroSource),
        );
        let mut buf = vec![1u8; huge];
        assert_eq!(zero.read_page(1, &mut buf).unwrap(), PageData::Bytes);
        assert_eq!((buf[0], buf[4096], buf[huge - 1]), (0, 7, 0));
    }
}
