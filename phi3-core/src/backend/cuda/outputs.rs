//! A forward pass's outputs brought to the host (`Backend::run_pass`): rows that ask for logits
//! copy them; rows that ask only for the greedy choice get it from `phi3_argmax_rows`
//! (`kernels/argmax.cu`) on the device and copy back one id (issue 7: "only the chosen token
//! copied back"). A greedy decode step of Phi-3 so moves 4 bytes instead of 128 KiB per
//! sequence, and the host does not scan the vocabulary.

use cudarc::driver::CudaSlice;

use super::error::DriverResultExt;
use super::CudaBackend;
use crate::backend::{host_outputs, OutputKind, SeqOutput};
use crate::error::{Error, Result};

/// Each row's limit for `phi3_argmax_rows`: a greedy row's (at most `out_cols`), 0 for a row
/// that wants its logits (its choice, -1, is not read).
pub(super) fn argmax_limits(outputs: &[OutputKind], out_cols: usize) -> Vec<i32> {
    outputs
        .iter()
        .map(|kind| match *kind {
            OutputKind::Greedy { limit } => limit.min(out_cols).min(i32::MAX as usize) as i32,
            OutputKind::Logits => 0,
        })
        .collect()
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
        if only_logits(outputs) {
            return self.collect_outputs(logits, None, outputs, out_cols);
        }
        let limits = self.htod(&argmax_limits(outputs, out_cols), "greedy limits")?;
        let mut chosen = self.alloc::<i32>(outputs.len(), "greedy choices")?;
        self.launch_argmax_rows(logits, &limits, &mut chosen, outputs.len(), out_cols)?;
        self.collect_outputs(logits, Some(&chosen), outputs, out_cols)
    }

    /// The rows' outputs once `chosen` holds `phi3_argmax_rows`'s choices for them (a graph ran
    /// it, or `pass_outputs`; `None` only when every row wants its logits): the logits of the
    /// rows that want them, in one copy when all do, and every greedy row's id, copied once all
    /// earlier work is done.
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
        let chosen = chosen.ok_or_else(|| Error::internal("greedy rows without their choices"))?;
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
        let ids = self.dtoh_prefix(chosen, outputs.len())?; // waits for the copies above too
        let mut rows_logits = rows_logits.into_iter();
        outputs
            .iter()
            .zip(ids)
            .map(|(kind, id)| match *kind {
                OutputKind::Logits => rows_logits
                    .next()
                    .map(SeqOutput::Logits)
                    .ok_or_else(|| Error::internal("a logits row was not copied")),
                OutputKind::Greedy { limit } => greedy_id(id, limit.min(out_cols)),
            })
            .collect()
    }
}

/// Whether every row wants its logits (no greedy choice to make).
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
}
