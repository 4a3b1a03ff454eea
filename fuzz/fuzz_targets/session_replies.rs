//! Arbitrary bytes as the dongle's answer to a runtime: to its hello, and to an open session's
//! request. The runtime's session must refuse them without panicking.

#![no_main]

use dongle::{Firmware, Flash, Request, RuntimeId, Serial, Session, SigningKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let vendor = SigningKey::from_bytes(&[1; 32]);
    let runtime = RuntimeId::new("fuzz").unwrap();

    let (mut session, _hello) =
        Session::start(runtime.clone(), [5; 32], vec![vendor.verifying_key()]);
    let _ = session.accept(data);

    let mut firmware = Firmware::power_on(
        Flash::manufacture(Serial(1), [2; 32], [3; 32], &vendor),
        1_000,
    );
    let (mut session, hello) = Session::start(runtime, [6; 32], vec![vendor.verifying_key()]);
    let accept = firmware.handle_frame(&hello, 1_000);
    session.accept(&accept).unwrap();
    session.request(&Request::ReadClock).unwrap();
    let _ = session.receive(data);
});
