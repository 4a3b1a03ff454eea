//! 64-byte HID reports: frames are chunked into reports and reassembled.
//!
//! Initial report: `0x80`, frame length (u16 big endian), then up to 61 payload bytes.
//! Continuation report: sequence number `0x00..=0x7f`, then up to 63 payload bytes.
//! Unused tail bytes are zero. The same reports travel over a Unix socket and over USB HID.

use crate::wire::MAX_FRAME_LEN;

/// Size of one HID report.
pub const REPORT_LEN: usize = 64;

/// One HID report.
pub type Report = [u8; REPORT_LEN];

const INIT_MARKER: u8 = 0x80;
const INIT_PAYLOAD: usize = REPORT_LEN - 3;
const CONT_PAYLOAD: usize = REPORT_LEN - 1;
const MAX_SEQUENCE: u8 = 0x7f;

/// Reports that do not make a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// A report that is not 64 bytes.
    #[error("Report of {0} bytes, expected 64")]
    WrongLength(usize),
    /// An empty frame.
    #[error("Empty frame")]
    EmptyFrame,
    /// A frame longer than the limit.
    #[error("Frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    /// A continuation report with no frame started.
    #[error("Continuation report without an initial report")]
    UnexpectedContinuation,
    /// A continuation report out of sequence.
    #[error("Report sequence {got}, expected {expected}")]
    SequenceGap {
        /// Expected sequence number.
        expected: u8,
        /// Received sequence number.
        got: u8,
    },
    /// An initial report with reserved marker bits set.
    #[error("Invalid report marker {0:#04x}")]
    BadMarker(u8),
}

/// Chunks a frame into HID reports.
pub fn encode_reports(frame: &[u8]) -> Result<Vec<Report>, ReportError> {
    if frame.is_empty() {
        return Err(ReportError::EmptyFrame);
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(ReportError::FrameTooLarge(frame.len()));
    }
    let (first, rest) = frame.split_at(frame.len().min(INIT_PAYLOAD));
    let mut reports = Vec::with_capacity(1 + rest.len().div_ceil(CONT_PAYLOAD));
    let mut init = [0u8; REPORT_LEN];
    init[0] = INIT_MARKER;
    init[1..3].copy_from_slice(&(frame.len() as u16).to_be_bytes());
    init[3..3 + first.len()].copy_from_slice(first);
    reports.push(init);
    for (sequence, chunk) in rest.chunks(CONT_PAYLOAD).enumerate() {
        let mut report = [0u8; REPORT_LEN];
        report[0] = sequence as u8;
        report[1..1 + chunk.len()].copy_from_slice(chunk);
        reports.push(report);
    }
    Ok(reports)
}

/// Reassembles frames from a stream of reports (one per connection).
#[derive(Debug, Default)]
pub struct ReportAssembler {
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    frame: Vec<u8>,
    expected_len: usize,
    next_sequence: u8,
}

impl ReportAssembler {
    /// An assembler waiting for an initial report.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while a frame is half received.
    pub fn is_partial(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes one report; returns a frame when it is complete. Never panics; on error the
    /// half-received frame is dropped and the next initial report starts afresh.
    pub fn push(&mut self, report: &[u8]) -> Result<Option<Vec<u8>>, ReportError> {
        let result = self.push_inner(report);
        if result.is_err() {
            self.partial = None;
        }
        result
    }

    fn push_inner(&mut self, report: &[u8]) -> Result<Option<Vec<u8>>, ReportError> {
        let report: &Report = report
            .try_into()
            .map_err(|_| ReportError::WrongLength(report.len()))?;
        let marker = report[0];
        if marker & INIT_MARKER != 0 {
            if marker != INIT_MARKER {
                return Err(ReportError::BadMarker(marker));
            }
            if self.partial.is_some() {
                tracing::warn!("initial report interrupts a half-received frame; dropping it");
            }
            let expected_len = usize::from(u16::from_be_bytes([report[1], report[2]]));
            if expected_len == 0 {
                return Err(ReportError::EmptyFrame);
            }
            if expected_len > MAX_FRAME_LEN {
                return Err(ReportError::FrameTooLarge(expected_len));
            }
            let take = expected_len.min(INIT_PAYLOAD);
            let mut frame = Vec::with_capacity(expected_len);
            frame.extend_from_slice(&report[3..3 + take]);
            self.partial = Some(Partial {
                frame,
                expected_len,
                next_sequence: 0,
            });
        } else {
            let partial = self
                .partial
                .as_mut()
                .ok_or(ReportError::UnexpectedContinuation)?;
            if marker != partial.next_sequence {
                return Err(ReportError::SequenceGap {
                    expected: partial.next_sequence,
                    got: marker,
                });
            }
            let take = (partial.expected_len - partial.frame.len()).min(CONT_PAYLOAD);
            partial.frame.extend_from_slice(&report[1..1 + take]);
            partial.next_sequence = partial
                .next_sequence
                .saturating_add(1)
                .min(MAX_SEQUENCE + 1);
        }
        let complete = self
            .partial
            .as_ref()
            .is_some_and(|partial| partial.frame.len() == partial.expected_len);
        if complete {
            Ok(self.partial.take().map(|partial| partial.frame))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn reassemble(reports: &[Report]) -> Vec<Vec<u8>> {
        let mut assembler = ReportAssembler::new();
        reports
            .iter()
            .filter_map(|report| assembler.push(report).unwrap())
            .collect()
    }

    #[rstest]
    #[case(1, 1)]
    #[case(61, 1)]
    #[case(62, 2)]
    #[case(124, 2)]
    #[case(125, 3)]
    #[case(MAX_FRAME_LEN, 66)]
    fn chunk_and_reassemble(#[case] len: usize, #[case] reports: usize) {
        let frame: Vec<u8> = (0..len).map(|index| (index % 251) as u8).collect();
        let encoded = encode_reports(&frame).unwrap();
        assert_eq!(encoded.len(), reports);
        assert_eq!(reassemble(&encoded), vec![frame]);
    }

    #[test]
    fn size_limits() {
        assert_eq!(encode_reports(&[]), Err(ReportError::EmptyFrame));
        assert_eq!(
            encode_reports(&vec![0; MAX_FRAME_LEN + 1]),
            Err(ReportError::FrameTooLarge(MAX_FRAME_LEN + 1))
        );
        let mut init = [0u8; REPORT_LEN];
        init[0] = INIT_MARKER;
        init[1..3].copy_from_slice(&((MAX_FRAME_LEN + 1) as u16).to_be_bytes());
        assert_eq!(
            ReportAssembler::new().push(&init),
            Err(ReportError::FrameTooLarge(MAX_FRAME_LEN + 1))
        );
    }

    #[test]
    fn protocol_errors_reset_the_assembler() {
        let frame = vec![5u8; 200];
        let reports = encode_reports(&frame).unwrap();
        let mut assembler = ReportAssembler::new();
        assert_eq!(
            assembler.push(&reports[1]),
            Err(ReportError::UnexpectedContinuation)
        );
        assert_eq!(
            assembler.push(&reports[..1].concat()[..10]),
            Err(ReportError::WrongLength(10))
        );
        assert_eq!(assembler.push(&reports[0]), Ok(None));
        assert_eq!(
            assembler.push(&reports[2]),
            Err(ReportError::SequenceGap {
                expected: 0,
                got: 1
            })
        );
        assert!(!assembler.is_partial());
        let mut bad = reports[0];
        bad[0] = 0x81;
        assert_eq!(assembler.push(&bad), Err(ReportError::BadMarker(0x81)));
        assert_eq!(reassemble(&reports), vec![frame]);
    }

    #[test]
    fn new_initial_report_restarts() {
        let first = encode_reports(&[1u8; 100]).unwrap();
        let second = encode_reports(&[2u8; 100]).unwrap();
        let mut assembler = ReportAssembler::new();
        assert_eq!(assembler.push(&first[0]), Ok(None));
        assert_eq!(assembler.push(&second[0]), Ok(None));
        assert_eq!(assembler.push(&second[1]), Ok(Some(vec![2u8; 100])));
    }
}
