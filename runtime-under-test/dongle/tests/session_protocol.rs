//! The session protocol end to end: a host `Session` and a `Firmware` exchanging 64-byte reports.

use dongle::{
    CertificateError, Denial, DevicePort, DonglePolicy, FaultCode, Firmware, Flash, ItemCounting,
    LockoutReason, ProductItem, ReportAssembler, Request, Response, RuntimeId, Serial, Session,
    SessionError, SigningKey, VerifyingKey, WitnessHead, encode_reports,
};
use rstest::rstest;

const T0: u64 = 1_700_000_000_000;
const SECOND: u64 = 1_000;
const FIRM: u32 = 10;
const CAD: u32 = 1001;
const METERED: u32 = 2002;
const EXPIRING: u32 = 3003;

fn vendor() -> SigningKey {
    SigningKey::from_bytes(&[0x11; 32])
}

fn trusted() -> Vec<VerifyingKey> {
    vec![vendor().verifying_key()]
}

fn item(code: u32, units: Option<u64>, expires_at: Option<u64>) -> ProductItem {
    ProductItem {
        firm: FIRM,
        code,
        name: format!("product-{code}"),
        quantity: 1,
        counting: ItemCounting::StationShare,
        expires_at,
        units,
        deny_virtual_machines: false,
        deny_terminal_server: false,
    }
}

fn flash() -> Flash {
    let mut flash = Flash::manufacture(Serial(3_000_001), [0x22; 32], [0x33; 32], &vendor());
    flash
        .program_item(&vendor(), item(CAD, None, None))
        .unwrap();
    flash
        .program_item(&vendor(), item(METERED, Some(10), None))
        .unwrap();
    flash
        .program_item(&vendor(), item(EXPIRING, None, Some(T0 + 3_600 * SECOND)))
        .unwrap();
    flash
}

fn runtime(name: &str) -> RuntimeId {
    RuntimeId::new(name).unwrap()
}

/// The key of the runtime called `name` (one per name).
fn key_of(name: &str) -> SigningKey {
    let mut seed = [0x5a; 32];
    for (slot, byte) in seed.iter_mut().zip(name.bytes().cycle()) {
        *slot ^= byte;
    }
    SigningKey::from_bytes(&seed)
}

/// A dongle with a clock the test moves, reached through HID reports.
struct Rig {
    firmware: Firmware,
    now: u64,
    secrets: u8,
}

impl Rig {
    fn new() -> Self {
        Self::with_flash(flash())
    }

    fn with_flash(flash: Flash) -> Self {
        Self {
            firmware: Firmware::power_on(flash, T0),
            now: T0,
            secrets: 0,
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    /// Sends a frame as reports through a fresh port and reassembles the reply.
    fn exchange(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut port = DevicePort::new();
        let mut assembler = ReportAssembler::new();
        let mut reply = None;
        for report in encode_reports(frame).unwrap() {
            for back in port.receive_report(&mut self.firmware, &report, self.now) {
                if let Some(frame) = assembler.push(&back).unwrap() {
                    reply = Some(frame);
                }
            }
        }
        reply.expect("the dongle answers every frame")
    }

    fn hello(&mut self, name: &str) -> (Session, Vec<u8>) {
        self.secrets += 1;
        Session::start(runtime(name), &key_of(name), [self.secrets; 32], trusted())
    }

    fn connect(&mut self, name: &str) -> Result<Session, SessionError> {
        let (mut session, hello) = self.hello(name);
        let reply = self.exchange(&hello);
        session.accept(&reply)?;
        Ok(session)
    }

    fn call(&mut self, session: &mut Session, request: Request) -> Result<Response, SessionError> {
        let frame = session.request(&request)?;
        let reply = self.exchange(&frame);
        session.receive(&reply)
    }
}

#[test]
fn session_lists_accesses_and_spends_units() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    assert_eq!(session.dongle().unwrap().serial, Serial(3_000_001));
    let Response::Items { now_ms, items } = rig.call(&mut session, Request::ListItems).unwrap()
    else {
        panic!("items expected");
    };
    assert_eq!(now_ms, T0);
    assert_eq!(items.len(), 3);
    let Response::Granted { handle, item } = rig
        .call(
            &mut session,
            Request::Access {
                firm: FIRM,
                code: CAD,
            },
        )
        .unwrap()
    else {
        panic!("grant expected");
    };
    assert_eq!(item.code, CAD);
    assert_eq!(rig.firmware.status(rig.now).open_accesses, 1);
    assert_eq!(
        rig.call(&mut session, Request::Release { handle }).unwrap(),
        Response::Released
    );
    assert_eq!(
        rig.call(&mut session, Request::Release { handle }).unwrap(),
        Response::Denied(Denial::UnknownHandle)
    );
    let spend = Request::DecrementUnits {
        firm: FIRM,
        code: METERED,
        units: 4,
    };
    assert_eq!(
        rig.call(&mut session, spend.clone()).unwrap(),
        Response::Units { remaining: 6 }
    );
    assert_eq!(
        rig.call(&mut session, spend.clone()).unwrap(),
        Response::Units { remaining: 2 }
    );
    assert_eq!(
        rig.call(&mut session, spend).unwrap(),
        Response::Denied(Denial::UnitsExhausted { remaining: 2 })
    );
    assert_eq!(
        rig.call(
            &mut session,
            Request::DecrementUnits {
                firm: FIRM,
                code: CAD,
                units: 1
            }
        )
        .unwrap(),
        Response::Denied(Denial::NotMetered)
    );
    assert_eq!(
        rig.call(
            &mut session,
            Request::Access {
                firm: FIRM,
                code: 9
            }
        )
        .unwrap(),
        Response::Denied(Denial::UnknownItem)
    );
    assert_eq!(
        rig.call(&mut session, Request::Close).unwrap(),
        Response::Closed
    );
    assert!(!session.is_open());
    assert!(matches!(
        session.request(&Request::ReadClock),
        Err(SessionError::NotOpen)
    ));
}

#[test]
fn tampered_handshake_signature_refused() {
    let mut rig = Rig::new();
    let (mut session, hello) = rig.hello("vm1");
    let mut reply = rig.exchange(&hello);
    *reply.last_mut().unwrap() ^= 0x01;
    let error = session.accept(&reply).unwrap_err();
    assert!(matches!(error, SessionError::BadSignature(_)), "{error:?}");
    assert_eq!(error.reason_code(), Some("signature-invalid"));
    assert!(!session.is_open());
}

/// A flash whose JSON was edited: the attacker's way to build an emulator that lies.
fn edited_flash(edit: impl FnOnce(&mut serde_json::Value)) -> Flash {
    let mut json = serde_json::to_value(flash()).unwrap();
    edit(&mut json);
    serde_json::from_value(json).unwrap()
}

#[test]
fn device_key_not_matching_certificate_refused() {
    let cloned = edited_flash(|json| json["device-secret"] = hex::encode([0x44u8; 32]).into());
    let mut rig = Rig::with_flash(cloned);
    assert!(matches!(
        rig.connect("vm1"),
        Err(SessionError::BadSignature(_))
    ));
}

#[rstest]
#[case::untrusted_vendor(vec![SigningKey::from_bytes(&[0x55; 32]).verifying_key()])]
#[case::nobody_trusted(vec![])]
fn dongle_from_untrusted_vendor_refused(#[case] trusted_vendors: Vec<VerifyingKey>) {
    let mut rig = Rig::new();
    let (mut session, hello) =
        Session::start(runtime("vm1"), &key_of("vm1"), [9; 32], trusted_vendors);
    let reply = rig.exchange(&hello);
    let error = session.accept(&reply).unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::Certificate(CertificateError::UntrustedVendor(_))
        ),
        "{error:?}"
    );
}

#[test]
fn forged_vendor_certificate_refused() {
    let rogue = SigningKey::from_bytes(&[0x66; 32]);
    let mut forged = Flash::manufacture(Serial(9), [0x22; 32], [0x33; 32], &rogue);
    forged.program_item(&rogue, item(CAD, None, None)).unwrap();
    let mut json = serde_json::to_value(forged).unwrap();
    json["certificate"]["vendor-key"] = hex::encode(vendor().verifying_key().to_bytes()).into();
    let mut rig = Rig::with_flash(serde_json::from_value(json).unwrap());
    let error = rig.connect("vm1").unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::Certificate(CertificateError::BadSignature(_))
        ),
        "{error:?}"
    );
}

#[test]
fn replayed_request_refused_and_units_spent_once() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    let frame = session
        .request(&Request::DecrementUnits {
            firm: FIRM,
            code: METERED,
            units: 3,
        })
        .unwrap();
    let reply = rig.exchange(&frame);
    assert_eq!(
        session.receive(&reply).unwrap(),
        Response::Units { remaining: 7 }
    );
    let replayed = rig.exchange(&frame);
    assert!(matches!(
        session.receive(&replayed),
        Err(SessionError::NoRequestOutstanding)
    ));
    assert_eq!(
        rig.firmware.flash().item(FIRM, METERED).unwrap().units,
        Some(7)
    );
    assert_eq!(
        dongle::Frame::decode(&replayed).unwrap().kind,
        dongle::FrameKind::Fault
    );
    // The fault names its code and carries the session's tag after it.
    let body = dongle::Frame::decode(&replayed).unwrap().body.to_vec();
    assert_eq!(body[0], FaultCode::Replayed.code());
    assert_eq!(body.len(), 1 + 32);
}

#[test]
fn replayed_response_refused_then_genuine_accepted() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    let first = session.request(&Request::ReadClock).unwrap();
    let old_reply = rig.exchange(&first);
    session.receive(&old_reply).unwrap();
    rig.advance(SECOND);
    let second = session.request(&Request::ReadClock).unwrap();
    let error = session.receive(&old_reply).unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::Replayed {
                expected: 1,
                got: 0
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_fatal());
    let reply = rig.exchange(&second);
    assert_eq!(
        session.receive(&reply).unwrap(),
        Response::Clock {
            now_ms: T0 + SECOND
        }
    );
}

#[test]
fn tampered_request_fails_authentication_without_side_effects() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    let mut frame = session
        .request(&Request::DecrementUnits {
            firm: FIRM,
            code: METERED,
            units: 1,
        })
        .unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0x80;
    let reply = rig.exchange(&frame);
    // The dongle cannot authenticate a fault for a frame it could not open: the runtime
    // ignores it and keeps waiting (a real loss of the session ends in a reply timeout).
    let error = session.receive(&reply).unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::UnauthenticatedFault(FaultCode::AuthenticationFailed)
        ),
        "{error:?}"
    );
    assert!(!error.is_fatal());
    assert_eq!(
        rig.firmware.flash().item(FIRM, METERED).unwrap().units,
        Some(10)
    );
}

#[test]
fn a_forged_fault_frame_is_ignored_and_the_genuine_reply_accepted() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    let request = session.request(&Request::ReadClock).unwrap();
    let sent = dongle::Frame::decode(&request).unwrap();
    // Anyone on the link (a USB/IP peer) answers first with a fault for the same session and
    // counter, plain or with a made-up tag.
    for body in [vec![FaultCode::UnknownSession.code()], {
        let mut forged = vec![FaultCode::Replayed.code()];
        forged.extend_from_slice(&[0x5a; 32]);
        forged
    }] {
        let forged = dongle::Frame {
            kind: dongle::FrameKind::Fault,
            session: sent.session,
            counter: sent.counter,
            body: &body,
        }
        .encode();
        let error = session.receive(&forged).unwrap_err();
        assert!(
            matches!(error, SessionError::UnauthenticatedFault(_)),
            "{error:?}"
        );
        assert!(!error.is_fatal());
    }
    let reply = rig.exchange(&request);
    assert!(matches!(
        session.receive(&reply).unwrap(),
        Response::Clock { .. }
    ));
}

#[test]
fn garbage_gets_a_fault_and_never_a_panic() {
    let mut rig = Rig::new();
    let reply = rig.exchange(b"definitely not a frame");
    let frame = dongle::Frame::decode(&reply).unwrap();
    assert_eq!(frame.kind, dongle::FrameKind::Fault);
    let mut session = rig.connect("vm1").unwrap();
    session.request(&Request::ReadClock).unwrap();
    assert!(matches!(
        session.receive(b"junk"),
        Err(SessionError::Frame(_))
    ));
}

#[test]
fn rebind_breaks_the_old_binding() {
    let mut rig = Rig::new();
    let mut first = rig.connect("vm1").unwrap();
    rig.call(
        &mut first,
        Request::Access {
            firm: FIRM,
            code: CAD,
        },
    )
    .unwrap();
    rig.advance(11 * SECOND);
    let mut second = rig.connect("vm2").unwrap();
    let error = rig.call(&mut first, Request::ReadClock).unwrap_err();
    assert!(matches!(error, SessionError::BindingBroken), "{error:?}");
    assert_eq!(error.reason_code(), Some("binding-broken"));
    assert!(error.is_fatal() && !first.is_open());
    assert!(matches!(
        rig.call(&mut second, Request::ReadClock),
        Ok(Response::Clock { .. })
    ));
    let status = rig.firmware.status(rig.now);
    assert_eq!(status.binding.unwrap().runtime, runtime("vm2"));
    assert_eq!(status.recent_rebinds, 1);
}

/// The active window boundary: a bind from another runtime 1 ms inside it is shared use.
#[rstest]
#[case::inside_window(9_999, Some(LockoutReason::Shared))]
#[case::at_window(10_000, None)]
fn bind_while_other_runtime_active(#[case] gap_ms: u64, #[case] lockout: Option<LockoutReason>) {
    let mut rig = Rig::new();
    let mut first = rig.connect("vm1").unwrap();
    rig.advance(5 * SECOND);
    rig.call(&mut first, Request::ReadClock).unwrap();
    rig.advance(gap_ms);
    let result = rig.connect("vm2");
    match lockout {
        Some(reason) => {
            let error = result.err().unwrap();
            assert!(
                matches!(error, SessionError::Locked { reason: got, .. } if got == reason),
                "{error:?}"
            );
            assert_eq!(error.reason_code(), Some("dongle-shared"));
            let old = rig.call(&mut first, Request::ReadClock).unwrap_err();
            assert!(
                matches!(
                    old,
                    SessionError::Locked {
                        reason: LockoutReason::Shared,
                        ..
                    }
                ),
                "{old:?}"
            );
        }
        None => {
            assert!(result.is_ok());
            assert!(matches!(
                rig.call(&mut first, Request::ReadClock),
                Err(SessionError::BindingBroken)
            ));
        }
    }
}

#[test]
fn shared_usb_interleaving_locks_out_both() {
    let mut rig = Rig::new();
    let mut first = rig.connect("vm1").unwrap();
    rig.call(
        &mut first,
        Request::Access {
            firm: FIRM,
            code: CAD,
        },
    )
    .unwrap();
    rig.advance(200);
    let error = rig.connect("vm2").unwrap_err();
    let SessionError::Locked { reason, until_ms } = error else {
        panic!("{error:?}")
    };
    assert_eq!(
        (reason, until_ms),
        (LockoutReason::Shared, T0 + 200 + 300 * SECOND)
    );
    assert_eq!(rig.firmware.status(rig.now).open_accesses, 0);
    assert!(rig.call(&mut first, Request::ReadClock).is_err());
    rig.advance(60 * SECOND);
    assert!(matches!(
        rig.connect("vm1"),
        Err(SessionError::Locked {
            reason: LockoutReason::Shared,
            ..
        })
    ));
    rig.advance(240 * SECOND);
    let mut again = rig.connect("vm1").unwrap();
    assert!(rig.call(&mut again, Request::ReadClock).is_ok());
    rig.advance(SECOND);
    assert!(matches!(
        rig.connect("vm2"),
        Err(SessionError::Locked {
            reason: LockoutReason::Shared,
            ..
        })
    ));
}

/// Hops between two runtimes, `gap` apart: 3 rebinds within 60 s pass, the 4th locks.
fn hop(rig: &mut Rig, rebinds: usize, gaps: &[u64]) -> Result<Session, SessionError> {
    let mut session = rig.connect("vm0")?;
    for (index, gap) in gaps.iter().take(rebinds).enumerate() {
        rig.advance(*gap);
        session = rig.connect(&format!("vm{}", (index + 1) % 2))?;
    }
    Ok(session)
}

#[rstest]
#[case::three_rebinds(3, [11_000, 11_000, 11_000, 11_000], None)]
#[case::four_rebinds(4, [11_000, 11_000, 11_000, 11_000], Some(LockoutReason::TooManyRebinds))]
#[case::fourth_one_ms_inside_window(4, [11_000, 20_000, 20_000, 19_999], Some(LockoutReason::TooManyRebinds))]
#[case::fourth_exactly_one_window_later(4, [11_000, 20_000, 20_000, 20_000], None)]
fn rebind_limit_boundaries(
    #[case] rebinds: usize,
    #[case] gaps: [u64; 4],
    #[case] lockout: Option<LockoutReason>,
) {
    let mut rig = Rig::new();
    let result = hop(&mut rig, rebinds, &gaps);
    match lockout {
        None => assert!(result.is_ok(), "{:?}", result.err()),
        Some(reason) => {
            let error = result.err().unwrap();
            assert!(
                matches!(error, SessionError::Locked { reason: got, .. } if got == reason),
                "{error:?}"
            );
            assert_eq!(error.reason_code(), Some("dongle-locked-out"));
        }
    }
}

#[test]
fn lockout_lasts_exactly_its_duration() {
    let mut rig = Rig::new();
    let error = hop(&mut rig, 4, &[11_000; 4]).err().unwrap();
    let SessionError::Locked { until_ms, .. } = error else {
        panic!("{error:?}")
    };
    assert_eq!(until_ms, rig.now + 300 * SECOND);
    rig.now = until_ms - 1;
    assert!(matches!(
        rig.connect("vm2"),
        Err(SessionError::Locked { .. })
    ));
    rig.now = until_ms;
    let mut session = rig.connect("vm2").unwrap();
    assert!(rig.call(&mut session, Request::ReadClock).is_ok());
    assert_eq!(rig.firmware.status(rig.now).recent_rebinds, 0);
}

#[test]
fn policy_is_programmable() {
    let mut flash = flash();
    let policy = DonglePolicy {
        max_rebinds: 1,
        rebind_window_ms: 30_000,
        lockout_ms: 1_000,
        active_window_ms: 2_000,
    };
    flash.set_policy(&vendor(), policy).unwrap();
    let mut rig = Rig::with_flash(flash);
    let error = hop(&mut rig, 2, &[3_000, 3_000]).err().unwrap();
    assert!(matches!(
        error,
        SessionError::Locked {
            reason: LockoutReason::TooManyRebinds,
            ..
        }
    ));
    rig.advance(1_000);
    assert!(rig.connect("vm2").is_ok());
}

#[test]
fn same_runtime_reconnect_counts_only_while_its_session_is_active() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    for _ in 0..5 {
        rig.advance(SECOND);
        rig.call(&mut session, Request::Close).unwrap();
        session = rig.connect("vm1").unwrap();
    }
    assert_eq!(rig.firmware.status(rig.now).recent_rebinds, 0);
    for _ in 0..3 {
        rig.advance(SECOND);
        rig.connect("vm1").unwrap();
    }
    rig.advance(SECOND);
    assert!(matches!(
        rig.connect("vm1"),
        Err(SessionError::Locked {
            reason: LockoutReason::TooManyRebinds,
            ..
        })
    ));
}

#[test]
fn bus_reset_ends_sessions_so_a_hop_is_a_rebind_not_sharing() {
    let mut rig = Rig::new();
    let mut first = rig.connect("vm1").unwrap();
    rig.call(&mut first, Request::ReadClock).unwrap();
    rig.advance(100);
    rig.firmware.bus_reset(rig.now);
    let mut second = rig.connect("vm2").unwrap();
    assert!(rig.call(&mut second, Request::ReadClock).is_ok());
    // The dongle no longer knows the first session, so it cannot authenticate its fault: the
    // first runtime hears nothing it may act on and times out.
    assert!(matches!(
        rig.call(&mut first, Request::ReadClock),
        Err(SessionError::UnauthenticatedFault(
            FaultCode::UnknownSession
        ))
    ));
}

#[test]
fn clock_refuses_to_go_backwards() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    assert_eq!(
        rig.call(&mut session, Request::SetClock { unix_ms: T0 - 1 })
            .unwrap(),
        Response::Denied(Denial::ClockBackwards { now_ms: T0 })
    );
    assert_eq!(
        rig.call(
            &mut session,
            Request::SetClock {
                unix_ms: T0 + 7_200 * SECOND
            }
        )
        .unwrap(),
        Response::Clock {
            now_ms: T0 + 7_200 * SECOND
        }
    );
    assert_eq!(
        rig.call(
            &mut session,
            Request::Access {
                firm: FIRM,
                code: EXPIRING
            }
        )
        .unwrap(),
        Response::Denied(Denial::Expired)
    );
    // The oscillator reads earlier (a host restarted the emulator with an old time): no effect.
    rig.now = T0 - 3_600 * SECOND;
    assert_eq!(
        rig.call(&mut session, Request::ReadClock).unwrap(),
        Response::Clock {
            now_ms: T0 + 7_200 * SECOND
        }
    );
    let flash = rig.firmware.into_flash();
    let mut rig = Rig::with_flash(flash);
    rig.now = T0 - 3_600 * SECOND;
    let mut session = rig.connect("vm1").unwrap();
    assert_eq!(
        rig.call(&mut session, Request::ReadClock).unwrap(),
        Response::Clock {
            now_ms: T0 + 7_200 * SECOND
        }
    );
}

/// A power cycle: flash written to JSON and read back, RAM lost.
fn power_cycle(rig: Rig) -> Rig {
    let json = serde_json::to_string(rig.firmware.flash()).unwrap();
    let flash: Flash = serde_json::from_str(&json).unwrap();
    let now = rig.now;
    let mut rig = Rig::with_flash(flash);
    rig.now = now;
    rig
}

#[test]
fn units_survive_power_cycles_and_host_snapshots() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    assert!(rig.firmware.take_flash_dirty());
    rig.call(
        &mut session,
        Request::DecrementUnits {
            firm: FIRM,
            code: METERED,
            units: 4,
        },
    )
    .unwrap();
    assert!(rig.firmware.take_flash_dirty());
    assert!(!rig.firmware.take_flash_dirty());
    let mut rig = power_cycle(rig);
    rig.advance(SECOND);
    // The guest was reverted to a snapshot: its runtime connects afresh with the same id.
    let mut reverted = rig.connect("vm1").unwrap();
    assert_eq!(
        rig.call(
            &mut reverted,
            Request::DecrementUnits {
                firm: FIRM,
                code: METERED,
                units: 1
            }
        )
        .unwrap(),
        Response::Units { remaining: 5 }
    );
    let rig = power_cycle(rig);
    assert_eq!(
        rig.firmware.flash().item(FIRM, METERED).unwrap().units,
        Some(5)
    );
}

#[test]
fn lockout_survives_power_cycles() {
    let mut rig = Rig::new();
    hop(&mut rig, 4, &[11_000; 4]).err().unwrap();
    let mut rig = power_cycle(rig);
    rig.advance(SECOND);
    assert!(matches!(
        rig.connect("vm1"),
        Err(SessionError::Locked {
            reason: LockoutReason::TooManyRebinds,
            ..
        })
    ));
}

#[test]
fn witness_keeps_the_newest_head_per_runtime() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    let head = |sequence, byte| WitnessHead {
        sequence,
        head: [byte; 32],
    };
    let store = |head| Request::WitnessStore { head };
    assert_eq!(
        rig.call(&mut session, store(head(5, 1))).unwrap(),
        Response::WitnessStored
    );
    assert_eq!(
        rig.call(&mut session, store(head(5, 1))).unwrap(),
        Response::WitnessStored
    );
    assert_eq!(
        rig.call(&mut session, store(head(4, 2))).unwrap(),
        Response::Denied(Denial::WitnessConflict { stored: head(5, 1) })
    );
    assert_eq!(
        rig.call(&mut session, store(head(5, 3))).unwrap(),
        Response::Denied(Denial::WitnessConflict { stored: head(5, 1) })
    );
    assert_eq!(
        rig.call(&mut session, store(head(6, 4))).unwrap(),
        Response::WitnessStored
    );
    let mut rig = power_cycle(rig);
    let mut session = rig.connect("vm2").unwrap();
    assert_eq!(
        rig.call(
            &mut session,
            Request::WitnessGet {
                runtime: runtime("vm1")
            }
        )
        .unwrap(),
        Response::Witness(Some(head(6, 4)))
    );
    assert_eq!(
        rig.call(
            &mut session,
            Request::WitnessGet {
                runtime: runtime("vm2")
            }
        )
        .unwrap(),
        Response::Witness(None)
    );
}

#[test]
fn one_request_outstanding_at_a_time() {
    let mut rig = Rig::new();
    let mut session = rig.connect("vm1").unwrap();
    session.request(&Request::ReadClock).unwrap();
    assert!(matches!(
        session.request(&Request::ReadClock),
        Err(SessionError::RequestOutstanding)
    ));
}

/// Shared USB as the simulator wires it: one connection (port) per host, reports of the two
/// hosts interleaved at the device. Each port reassembles its own frames; the second host's
/// hello lands while the first is active, so both are locked out.
#[test]
fn interleaved_reports_from_two_hosts_reassemble_per_port() {
    let mut rig = Rig::new();
    let mut first = rig.connect("vm1").unwrap();
    let long_id = runtime(&"a-long-runtime-id-".repeat(3));
    let request = first
        .request(&Request::WitnessGet {
            runtime: long_id.clone(),
        })
        .unwrap();
    let (mut second, hello) = Session::start(long_id, &key_of("long"), [0x77; 32], trusted());
    let (request_reports, hello_reports) = (
        encode_reports(&request).unwrap(),
        encode_reports(&hello).unwrap(),
    );
    assert!(hello_reports.len() >= request_reports.len() && request_reports.len() > 1);
    // Aligned at their ends: the request's reports interleave with the hello's, and its last
    // one arrives just after the hello completes.
    let offset = hello_reports.len() - request_reports.len();
    let (mut port_a, mut port_b) = (DevicePort::new(), DevicePort::new());
    let (mut back_a, mut back_b) = (Vec::new(), Vec::new());
    for (index, report) in hello_reports.iter().enumerate() {
        back_b.extend(port_b.receive_report(&mut rig.firmware, report, rig.now));
        if let Some(report) = index
            .checked_sub(offset)
            .and_then(|at| request_reports.get(at))
        {
            back_a.extend(port_a.receive_report(&mut rig.firmware, report, rig.now));
        }
    }
    let reassemble = |reports: Vec<dongle::Report>| {
        let mut assembler = ReportAssembler::new();
        reports
            .iter()
            .find_map(|report| assembler.push(report).unwrap())
            .unwrap()
    };
    let hello_error = second.accept(&reassemble(back_b)).unwrap_err();
    assert!(
        matches!(
            hello_error,
            SessionError::Locked {
                reason: LockoutReason::Shared,
                ..
            }
        ),
        "{hello_error:?}"
    );
    let request_error = first.receive(&reassemble(back_a)).unwrap_err();
    assert!(
        matches!(
            request_error,
            SessionError::Locked {
                reason: LockoutReason::Shared,
                ..
            }
        ),
        "{request_error:?}"
    );
}

/// A runtime presenting another's id with its own key is another runtime: binding while the
/// owner of the id is active is shared use.
#[test]
fn the_same_id_with_another_key_is_another_runtime() {
    let mut rig = Rig::new();
    let mut first = rig.connect("vm1").unwrap();
    rig.advance(SECOND);
    rig.call(&mut first, Request::ReadClock).unwrap();
    let impostor = SigningKey::from_bytes(&[0x99; 32]);
    let (mut session, hello) = Session::start(runtime("vm1"), &impostor, [0x42; 32], trusted());
    let reply = rig.exchange(&hello);
    let error = session.accept(&reply).unwrap_err();
    assert_eq!(error.reason_code(), Some("dongle-shared"), "{error:?}");
}

/// A hello whose proof does not verify is refused as malformed and binds nothing.
#[test]
fn a_hello_with_a_forged_key_proof_is_refused() {
    let mut rig = Rig::new();
    let (_, mut hello) = Session::start(runtime("vm1"), &key_of("vm1"), [0x43; 32], trusted());
    // The proof is the body's last 64 bytes (postcard, fixed-size arrays).
    let last = hello.len() - 1;
    hello[last] ^= 1;
    let (mut session, _) = Session::start(runtime("vm1"), &key_of("vm1"), [0x43; 32], trusted());
    let reply = rig.exchange(&hello);
    assert!(session.accept(&reply).is_err());
    assert!(rig.firmware.status(rig.now).binding.is_none());
}
