//! A step's layout on the device: one buffer of u32 words holding, per
//! token, its id, KV-cache slot and position, then each sequence's last row
//! and the query tiles of the prefill attention kernel.

use anyhow::Result;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::Gpu;
use super::memory::DevBuf;
use crate::backend::StepLayout;

/// Query rows per prefill attention tile.
pub const TILE_ROWS: usize = 32;

/// The device copy of a [`StepLayout`] plus the host facts kernels are
/// launched with.
#[derive(Debug)]
pub struct CudaLayout {
    /// The layout as uploaded.
    pub host: StepLayout,
    /// Number of attention tiles.
    pub tiles: usize,
    buf: DevBuf,
}

/// Flattens `layout` into the word buffer the kernels read.
pub fn layout_words(layout: &StepLayout) -> (Vec<u32>, usize) {
    let n = layout.num_tokens();
    let mut words = Vec::with_capacity(3 * n + layout.seqs.len() * 5);
    words.extend_from_slice(&layout.tokens);
    let positions = layout.token_positions();
    words.extend(positions.iter().map(|&(slot, _)| slot as u32));
    words.extend(positions.iter().map(|&(_, pos)| pos as u32));
    words.extend(layout.last_rows().iter().map(|&r| r as u32));
    let mut tiles = 0;
    let mut row = 0;
    for s in &layout.seqs {
        let mut i = 0;
        while i < s.len {
            let rows = TILE_ROWS.min(s.len - i);
            words.extend_from_slice(&[
                (row + i) as u32,
                rows as u32,
                s.slot as u32,
                (s.start + i) as u32,
            ]);
            tiles += 1;
            i += rows;
        }
        row += s.len;
    }
    (words, tiles)
}

impl CudaLayout {
    /// Uploads `layout` into a buffer from the GPU's current pool.
    pub fn new(gpu: &Gpu, layout: &StepLayout) -> Result<CudaLayout> {
        let (words, tiles) = layout_words(layout);
        let buf = gpu.alloc(words.len() * 4)?;
        gpu.upload(buf.ptr(), &words)?;
        Ok(CudaLayout {
            host: layout.clone(),
            tiles,
            buf,
        })
    }

    /// Overwrites the device words with those of `layout`, which must have
    /// the same shape (tokens per sequence) as the uploaded one.
    pub fn rewrite(&mut self, gpu: &Gpu, layout: &StepLayout) -> Result<()> {
        let (words, tiles) = layout_words(layout);
        let (old, old_tiles) = layout_words(&self.host);
        anyhow::ensure!(
            words.len() == old.len() && tiles == old_tiles,
            "layout shape changed under a captured step"
        );
        gpu.upload(self.buf.ptr(), &words)?;
        self.host = layout.clone();
        Ok(())
    }

    /// Number of tokens.
    pub fn n(&self) -> usize {
        self.host.num_tokens()
    }

    fn word(&self, index: usize) -> CUdeviceptr {
        self.buf.ptr() + 4 * index as u64
    }

    /// Token ids.
    pub fn tokens(&self) -> CUdeviceptr {
        self.word(0)
    }

    /// KV-cache slot of each token.
    pub fn slots(&self) -> CUdeviceptr {
        self.word(self.n())
    }

    /// Position of each token.
    pub fn positions(&self) -> CUdeviceptr {
        self.word(2 * self.n())
    }

    /// Row of each sequence's last token.
    pub fn last_rows(&self) -> CUdeviceptr {
        self.word(3 * self.n())
    }

    /// Prefill attention tiles, 4 words each.
    pub fn tile_table(&self) -> CUdeviceptr {
        self.word(3 * self.n() + self.host.seqs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_hold_tokens_slots_positions_last_rows_and_tiles() {
        let a: Vec<u32> = (0..40).collect();
        let layout = StepLayout::new([(2, 5, &a[..]), (0, 7, &[9u32][..])]).unwrap();
        let (w, tiles) = layout_words(&layout);
        let n = 41;
        assert_eq!(&w[..n], &[a.clone(), vec![9]].concat()[..]);
        assert_eq!(w[n], 2);
        assert_eq!(w[2 * n], 5);
        assert_eq!(w[2 * n + 39], 44);
        assert_eq!(w[3 * n - 1], 7);
        assert_eq!(&w[3 * n..3 * n + 2], &[39, 40]);
        assert_eq!(tiles, 3);
        assert_eq!(&w[3 * n + 2..], &[0, 32, 2, 5, 32, 8, 2, 37, 40, 1, 0, 7]);
    }
}
