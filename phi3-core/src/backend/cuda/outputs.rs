//! A forward pass's outputs brought to the host (`Backend::run_pass`): rows that ask for logits
//! copy them; rows that ask only for the greedy choice get it from `phi3_argmax_rows`
//! (`kernels/argmax.cu`) on the device and copy back one id; rows that ask for a top-k step's
//! candidates get them from `phi3_top_candidates` (`kernels/top_candidates.cu`) and copy back
//! about k (id, logit) pairs (issue 7: "only the chosen token copied back"). A greedy decode step
//! of Phi-3 so moves 4 bytes instead of 128 KiB per sequence, a top-k 50 step under 1 KiB, and
//! the host does not scan the vocabulary.

use cudarc::driver::CudaSlice;

use super::error::DriverResultExt;
use super::ops::PerRow;
use super::CudaBackend;
use crate::backend::{host_outputs, OutputKind, SeqOutput};
use crate::error::{Error, Result};
use crate::sampler::{check_candidates, MAX_CANDIDATES};

/// Each row's limit for `phi3_argmax_rows`: a greedy row's (at most `out_cols`), 0 for a row
/// that wants something else (its choice, -1, is not read).
pub(super) fn argmax_limits(outputs: &[OutputKind], out_cols: usize) -> Vec<i32> {
    outputs
        .iter()
        .map(|kind| match *kind {
            OutputKind::Greedy { limit } => limit.min(out_cols).min(i32::MAX as usize) as i32,
            OutputKind::Logits | OutputKind::Candidates { .. } => 0,
        })
        .collect()
}

/// The one value every item has, if they all have the same (None for none).
fn same<T: PartialEq + Copy>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let first = items.next()?;
    items.all(|x| x == first).then_some(first)
}

/// What `phi3_top_candidates` is asked: `wanted`, `(limit, count)` per row (`(0, 0)` for rows
/// that want something else), `same` when every row asks the same (no copy of `wanted` then),
/// and the stride of its output (the largest count).
#[derive(Debug, PartialEq)]
struct CandidateRequests {
    wanted: Vec<i32>,
    same: Option<(i32, i32)>,
    stride: usize,
}

/// The pass's [`CandidateRequests`]; None when no row wants candidates; Internal for a count
/// above [`MAX_CANDIDATES`].
fn candidate_requests(
    outputs: &[OutputKind],
    out_cols: usize,
) -> Result<Option<CandidateRequests>> {
    let mut wanted = Vec::with_capacity(2 * outputs.len());
    let mut stride = 0;
    for kind in outputs {
        let (limit, count) = match *kind {
            OutputKind::Candidates { limit, count } => (limit.min(out_cols), count),
            _ => (0, 0),
        };
        if count > MAX_CANDIDATES {
            return Err(Error::internal(format!(
                "{count} candidates asked of one row (at most {MAX_CANDIDATES})"
            )));
        }
        stride = stride.max(count);
        wanted.extend([limit.min(i32::MAX as usize) as i32, count as i32]);
    }
    let same = same(wanted.chunks(2).map(|w| (w[0], w[1])));
    Ok((stride > 0).then_some(CandidateRequests { wanted, same, stride }))
}

impl CudaBackend {
    /// What `outputs` asks of each row of `logits` (`[outputs.len(), out_cols]` at its start),
    /// on the host once all earlier work is done: greedy rows are chosen on the device here.
    pub(super) fn pass_outputs(
        &self,
        logits: &CudaSlice<f32>,
        outputs: &[OutputKind],
        out_cols: usize,
    ) -> Result<Vec<SeqOutput>> {
        check_rows(logits, outputs, out_cols)?;
        if !outputs.iter().any(|k| matches!(k, OutputKind::Greedy { .. })) {
            return self.collect_outputs(logits, None, outputs, out_cols);
        }
        let limits = argmax_limits(outputs, out_cols);
        let mut held = None;
        let one_limit = same(limits.iter().copied());
        let per_row = self.per_row_input(&limits, one_limit, &mut held, "greedy limits")?;
        let mut chosen = self.alloc::<i32>(outputs.len(), "greedy choices")?;
        self.launch_argmax_rows(logits, per_row, &mut chosen, outputs.len(), out_cols)?;
        self.collect_outputs(logits, Some(&chosen), outputs, out_cols)
    }

    /// A per-row kernel input: `Same(value)` when every row has the same one (`same`), passed
    /// as kernel arguments; otherwise `values` copied to the device into `held`, which must live
    /// until the launch.
    fn per_row_input<'a, T>(
        &self,
        values: &[i32],
        same: Option<T>,
        held: &'a mut Option<CudaSlice<i32>>,
        what: &str,
    ) -> Result<PerRow<'a, T>> {
        if let Some(value) = same {
            return Ok(PerRow::Same(value));
        }
        Ok(PerRow::Device(held.insert(self.htod(values, what)?)))
    }

    /// The rows' outputs once `chosen` holds `phi3_argmax_rows`'s choices for them (a graph ran
    /// it, or `pass_outputs`; `None` only when no row is greedy): the logits of the rows that
    /// want them, in one copy when all do; every greedy row's id; and the candidates of the rows
    /// that want them, selected here (after the graph, if one ran). Copied once all earlier work
    /// is done.
    pub(super) fn collect_outputs(
        &self,
        logits: &CudaSlice<f32>,
        chosen: Option<&CudaSlice<i32>>,
        outputs: &[OutputKind],
        out_cols: usize,
    ) -> Result<Vec<SeqOutput>> {
        check_rows(logits, outputs, out_cols)?;
        if only_logits(outputs) {
            let all = self.dtoh_prefix(logits, outputs.len() * out_cols)?;
            return host_outputs(&all, outputs, out_cols);
        }
        let rows = outputs.len();
        let candidates = match candidate_requests(outputs, out_cols)? {
            Some(CandidateRequests { wanted, same, stride }) => {
                let mut held = None;
                let per_row = self.per_row_input(&wanted, same, &mut held, "candidate requests")?;
                let mut taken = self.alloc::<i32>(rows * (1 + 2 * stride), "candidates")?;
                self.launch_top_candidates(logits, per_row, &mut taken, rows, out_cols, stride)?;
                Some((taken, stride))
            }
            None => None,
        };
        let stream = &self.dev.stream;
        let mut rows_logits = Vec::new();
        for (row, kind) in outputs.iter().enumerate() {
            if *kind == OutputKind::Logits {
                let mut host = vec![0.0f32; out_cols];
                let range = row * out_cols..(row + 1) * out_cols;
                stream
                    .memcpy_dtoh(&logits.slice(range), &mut host)
                    .ctx("copy logits to the host")?;
                rows_logits.push(host);
            }
        }
        // Each copy below waits for everything before it on the stream, the copies above too.
        let ids = match chosen {
            Some(chosen) => self.dtoh_prefix(chosen, rows)?,
            None if outputs.iter().any(|k| matches!(k, OutputKind::Greedy { .. })) => {
                return Err(Error::internal("greedy rows without their choices"))
            }
            None => vec![-1; rows],
        };
        let (words, stride) = match &candidates {
            Some((taken, stride)) => (self.dtoh_prefix(taken, rows * (1 + 2 * stride))?, *stride),
            None => (Vec::new(), 0),
        };
        let mut rows_logits = rows_logits.into_iter();
        outputs
            .iter()
            .zip(ids)
            .enumerate()
            .map(|(row, (kind, id))| match *kind {
                OutputKind::Logits => rows_logits
                    .next()
                    .map(SeqOutput::Logits)
                    .ok_or_else(|| Error::internal("a logits row was not copied")),
                OutputKind::Greedy { limit } => greedy_id(id, limit.min(out_cols)),
                OutputKind::Candidates { limit, count } => {
                    let row_words = words.get(row * (1 + 2 * stride)..(row + 1) * (1 + 2 * stride));
                    let row_words = row_words
                        .ok_or_else(|| Error::internal("a candidates row was not copied"))?;
                    candidate_row(row_words, stride, limit.min(out_cols), count)
                }
            })
            .collect()
    }
}

/// Whether every row wants its logits (nothing to select on the device).
fn only_logits(outputs: &[OutputKind]) -> bool {
    outputs.iter().all(|k| *k == OutputKind::Logits)
}

/// `Internal` unless `logits` holds `outputs.len()` rows of `out_cols > 0` values.
fn check_rows(logits: &CudaSlice<f32>, outputs: &[OutputKind], out_cols: usize) -> Result<()> {
    if out_cols == 0 || logits.len() < outputs.len() * out_cols {
        return Err(Error::internal(format!(
            "pass outputs: {} values for {} rows of {out_cols}",
            logits.len(),
            outputs.len()
        )));
    }
    Ok(())
}

/// A greedy row's result from `phi3_argmax_rows`' `id`: -1 is no token; anything else outside
/// `0..limit` would be a kernel bug, reported rather than handed on as a token.
fn greedy_id(id: i32, limit: usize) -> Result<SeqOutput> {
    match id {
        -1 => Ok(SeqOutput::Greedy(None)),
        id if id >= 0 && (id as usize) < limit => Ok(SeqOutput::Greedy(Some(id as u32))),
        id => {
            Err(Error::internal(format!("the device's greedy choice {id} is outside 0..{limit}")))
        }
    }
}

/// A candidates row's result from `phi3_top_candidates`' output row `words`
/// (`[n, ids[stride], bits[stride]]`): the `n` pairs sorted by id. A count above what was asked,
/// or pairs that break `sampler::check_candidates` (an id outside `0..limit` or repeated, a
/// logit at -inf or NaN) would be a kernel bug, reported rather than sampled from.
fn candidate_row(words: &[i32], stride: usize, limit: usize, count: usize) -> Result<SeqOutput> {
    let bad = |what: String| Error::internal(format!("the device's sampling candidates: {what}"));
    let n = words.first().copied().unwrap_or(-1);
    if n < 0 || n as usize > count.min(stride) || words.len() < 1 + 2 * stride {
        return Err(bad(format!("{n} taken of {count} asked ({} words)", words.len())));
    }
    let n = n as usize;
    let mut entries: Vec<(u32, f32)> = (0..n)
        .map(|i| (words[1 + i] as u32, f32::from_bits(words[1 + stride + i] as u32)))
        .collect();
    entries.sort_unstable_by_key(|&(id, _)| id);
    check_candidates(&entries, limit, count).map_err(bad)?;
    Ok(SeqOutput::Candidates(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_ids() {
        let kinds = [
            OutputKind::Greedy { limit: 10 },
            OutputKind::Logits,
            OutputKind::Greedy { limit: usize::MAX },
        ];
        assert_eq!(argmax_limits(&kinds, 64), [10, 0, 64]);
        assert_eq!(greedy_id(-1, 10).unwrap(), SeqOutput::Greedy(None));
        assert_eq!(greedy_id(9, 10).unwrap(), SeqOutput::Greedy(Some(9)));
        for bad in [10, -2, i32::MAX] {
            assert!(greedy_id(bad, 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn candidate_requests_and_rows() {
        let kinds = [
            OutputKind::Candidates { limit: 10, count: 3 },
            OutputKind::Logits,
            OutputKind::Candidates { limit: usize::MAX, count: 5 },
        ];
        let mixed = CandidateRequests { wanted: vec![10, 3, 0, 0, 64, 5], same: None, stride: 5 };
        assert_eq!(candidate_requests(&kinds, 64).unwrap(), Some(mixed));
        assert_eq!(candidate_requests(&kinds[1..2], 64).unwrap(), None);
        // Every row asking the same: one request, passed as arguments.
        let alike = [kinds[2], OutputKind::Candidates { limit: 64, count: 5 }];
        let one = CandidateRequests { wanted: vec![64, 5, 64, 5], same: Some((64, 5)), stride: 5 };
        assert_eq!(candidate_requests(&alike, 64).unwrap(), Some(one));
        assert_eq!(same([3, 3, 3].into_iter()), Some(3));
        assert_eq!(same([3, 4].into_iter()), None);
        assert_eq!(same(std::iter::empty::<i32>()), None);
        let huge = [OutputKind::Candidates { limit: 10, count: MAX_CANDIDATES + 1 }];
        assert!(candidate_requests(&huge, 64).is_err());
        // [n, ids[4], bits[4]], taken in any order: sorted by id.
        let bits = |v: f32| v.to_bits() as i32;
        let row = [3, 7, 2, 5, 0, bits(1.5), bits(-2.0), bits(0.0), 0];
        assert_eq!(
            candidate_row(&row, 4, 10, 3).unwrap(),
            SeqOutput::Candidates(vec![(2, -2.0), (5, 0.0), (7, 1.5)])
        );
        assert_eq!(candidate_row(&[0; 9], 4, 10, 0).unwrap(), SeqOutput::Candidates(vec![]));
        let broken = [
            [4, 7, 2, 5, 1, bits(1.5), bits(-2.0), bits(0.0), 0], // more than asked
            [3, 7, 12, 5, 0, bits(1.5), bits(-2.0), bits(0.0), 0], // past the limit
            [3, 7, 7, 5, 0, bits(1.5), bits(-2.0), bits(0.0), 0], // twice
            [3, 7, 2, 5, 0, bits(1.5), bits(f32::NAN), bits(0.0), 0], // NaN
            [-1, 7, 2, 5, 0, bits(1.5), bits(-2.0), bits(0.0), 0],
        ];
        for words in broken {
            assert!(candidate_row(&words, 4, 10, 3).is_err(), "{words:?}");
        }
        assert!(candidate_row(&[1, 2], 4, 10, 3).is_err(), "a short row");
    }
}
