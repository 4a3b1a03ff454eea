//! Arbitrary bytes through the dongle's parsers: frame decoding, HID report reassembly and the
//! firmware's frame handler. None may panic; every reply must itself be a valid frame.

#![no_main]

use std::sync::OnceLock;

use dongle::{DevicePort, Firmware, Flash, Frame, REPORT_LEN, ReportAssembler, Serial, SigningKey};
use libfuzzer_sys::fuzz_target;

fn flash() -> &'static Flash {
    static FLASH: OnceLock<Flash> = OnceLock::new();
    FLASH.get_or_init(|| {
        Flash::manufacture(
            Serial(1),
            [2; 32],
            [3; 32],
            &SigningKey::from_bytes(&[1; 32]),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    // The frame parser, with the round trip it promises.
    if let Ok(frame) = Frame::decode(data) {
        assert_eq!(frame.encode(), data);
    }

    // Report reassembly: the input cut into 64-byte reports (tail padded), and unpadded.
    let mut assembler = ReportAssembler::new();
    for chunk in data.chunks(REPORT_LEN) {
        let mut report = [0u8; REPORT_LEN];
        report[..chunk.len()].copy_from_slice(chunk);
        if let Ok(Some(frame)) = assembler.push(&report) {
            assert!(!frame.is_empty() && frame.len() <= dongle::MAX_FRAME_LEN);
        }
        let _ = assembler.push(chunk);
    }

    // The firmware answers any frame, and any report stream, with a valid frame.
    let mut firmware = Firmware::power_on(flash().clone(), 1_000);
    let reply = firmware.handle_frame(data, 1_000);
    assert!(Frame::decode(&reply).is_ok());
    let mut port = DevicePort::new();
    for chunk in data.chunks(REPORT_LEN) {
        let _ = port.receive_report(&mut firmware, chunk, 2_000);
    }
});
