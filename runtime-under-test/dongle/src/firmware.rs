//! The dongle's firmware: answers hello and request frames, enforces binding and lockout rules.
//!
//! Rules, all in dongle oscillator time:
//! - A hello binds the dongle to the hello's runtime; the previous session is stale and its next
//!   request is answered `BindingBroken`.
//! - The bound session is *active* while it is not closed, no bus reset or power cycle happened
//!   since it was opened, and its last frame is younger than the policy's active window
//!   (default 10 s). A runtime must keep alive (e.g. `ReadClock`) well inside that window.
//! - A hello from another runtime while the bound session is active is shared use (two hosts
//!   interleaving frames over one shared USB device): lockout, reason `Shared`.
//! - A hello from another runtime otherwise is a rebind. A hello from the bound runtime while its
//!   own session is still active (a second instance of the same runtime id) also counts as one.
//!   Rebinds are remembered for the rebind window (60 s); one more than `max_rebinds` (3) inside
//!   the window locks the dongle out, reason `TooManyRebinds`. A rebind exactly one window after an
//!   earlier one no longer counts it.
//! - A lockout lasts `lockout_ms` (5 min); it clears the binding and the rebind history. While it
//!   lasts hellos are refused (signed) and requests answered `Locked`.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::Serialize;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::flash::{Binding, Flash, Lockout, LockoutReason, RuntimeId, Serial};
use crate::handshake::{self, SessionKeys};
use crate::protocol::{AcceptBody, Denial, DeviceReply, HelloBody, RefusedBody, Request, Response};
use crate::report::{Report, ReportAssembler, encode_reports};
use crate::wire::{FaultCode, Frame, FrameError, FrameKind, fault_frame};

/// Sessions the firmware keeps in RAM; older unbound ones are forgotten first.
pub const ACTIVE_SESSIONS_KEPT: usize = 8;

/// A session held in the dongle's RAM (lost on power cycle or bus reset).
struct LiveSession {
    runtime: RuntimeId,
    keys: SessionKeys,
    next_counter: u64,
    last_frame_ms: u64,
    closed: bool,
    accesses: BTreeMap<u32, (u32, u32)>,
    next_handle: u32,
}

/// What the dongle reports about itself, for emulators and test harnesses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DongleStatus {
    /// Serial number.
    pub serial: Serial,
    /// Dongle clock, unix milliseconds.
    pub clock_ms: u64,
    /// Oscillator, milliseconds.
    pub oscillator_ms: u64,
    /// Current binding.
    pub binding: Option<Binding>,
    /// Whether the bound session is active.
    pub bound_active: bool,
    /// Lockout in force.
    pub lockout: Option<Lockout>,
    /// Rebinds inside the current window.
    pub recent_rebinds: usize,
    /// Open accesses in the bound session.
    pub open_accesses: usize,
}

/// The dongle firmware: flash plus RAM sessions; sans-IO.
pub struct Firmware {
    flash: Flash,
    sessions: BTreeMap<u32, LiveSession>,
    flash_dirty: bool,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware")
            .field("serial", &self.flash.serial)
            .field("binding", &self.flash.binding)
            .field("lockout", &self.flash.lockout)
            .field("sessions", &self.sessions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Firmware {
    /// Powers the dongle on with its flash; `now_ms` is the oscillator reading.
    pub fn power_on(flash: Flash, now_ms: u64) -> Self {
        let mut firmware = Self {
            flash,
            sessions: BTreeMap::new(),
            flash_dirty: false,
        };
        firmware.observe(now_ms);
        firmware
    }

    /// The flash as it stands.
    pub fn flash(&self) -> &Flash {
        &self.flash
    }

    /// Powers off, keeping only the flash.
    pub fn into_flash(self) -> Flash {
        self.flash
    }

    /// True once if the flash changed since the last call (the emulator should persist it).
    pub fn take_flash_dirty(&mut self) -> bool {
        std::mem::take(&mut self.flash_dirty)
    }

    /// USB reset or re-plug: RAM sessions are lost, so no runtime is active any more; the binding
    /// in flash stays. Call it on every detach/attach, never when another host merely shares an
    /// attached device.
    pub fn bus_reset(&mut self, now_ms: u64) {
        self.observe(now_ms);
        if !self.sessions.is_empty() {
            tracing::debug!(serial = %self.flash.serial, sessions = self.sessions.len(), "bus reset drops sessions");
        }
        self.sessions.clear();
    }

    /// Stirs outside randomness into the entropy pool used for ephemeral keys.
    pub fn mix_entropy(&mut self, entropy: &[u8]) {
        self.flash.entropy_pool = handshake::mix_entropy(&self.flash.entropy_pool, entropy);
        self.flash_dirty = true;
    }

    /// The dongle's state at oscillator time `now_ms`.
    pub fn status(&mut self, now_ms: u64) -> DongleStatus {
        self.observe(now_ms);
        let oscillator = self.flash.clock.oscillator_ms;
        let binding = self.flash.binding.clone();
        let bound_active = binding
            .as_ref()
            .is_some_and(|binding| self.is_active(binding.session));
        let open_accesses = binding
            .as_ref()
            .and_then(|binding| self.sessions.get(&binding.session))
            .map_or(0, |session| session.accesses.len());
        let window = self.flash.policy.rebind_window_ms;
        DongleStatus {
            serial: self.flash.serial,
            clock_ms: self.flash.clock.now_ms(),
            oscillator_ms: oscillator,
            binding,
            bound_active,
            lockout: self.flash.lockout_at(oscillator),
            recent_rebinds: self
                .flash
                .rebinds
                .iter()
                .filter(|at| oscillator.saturating_sub(**at) < window)
                .count(),
            open_accesses,
        }
    }

    /// Handles one frame at oscillator time `now_ms` and returns the reply frame. Never panics.
    pub fn handle_frame(&mut self, bytes: &[u8], now_ms: u64) -> Vec<u8> {
        self.observe(now_ms);
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(FrameError::UnsupportedVersion(_)) => {
                return fault_frame(0, 0, FaultCode::UnsupportedVersion);
            }
            Err(error) => {
                tracing::debug!(%error, "malformed frame");
                return fault_frame(0, 0, FaultCode::Malformed);
            }
        };
        match frame.kind {
            FrameKind::Hello => self.handle_hello(&frame),
            FrameKind::Request => self.handle_request(&frame),
            _ => fault_frame(frame.session, frame.counter, FaultCode::Malformed),
        }
    }

    fn observe(&mut self, now_ms: u64) {
        if self.flash.clock.observe(now_ms) {
            self.flash_dirty = true;
        }
        let oscillator = self.flash.clock.oscillator_ms;
        if let Some(lockout) = self.flash.lockout
            && oscillator >= lockout.until_ms
        {
            tracing::info!(serial = %self.flash.serial, reason = lockout.reason.reason_code(), "lockout over");
            self.flash.lockout = None;
            self.flash_dirty = true;
        }
    }

    fn is_active(&self, session: u32) -> bool {
        let oscillator = self.flash.clock.oscillator_ms;
        self.sessions.get(&session).is_some_and(|live| {
            !live.closed
                && oscillator.saturating_sub(live.last_frame_ms)
                    < self.flash.policy.active_window_ms
        })
    }

    fn handle_hello(&mut self, frame: &Frame<'_>) -> Vec<u8> {
        let hello: HelloBody = match decode_exact(frame.body) {
            Some(hello) if frame.session == 0 => hello,
            _ => return fault_frame(frame.session, frame.counter, FaultCode::Malformed),
        };
        if !proves_its_key(&hello) {
            tracing::warn!(serial = %self.flash.serial, runtime = %hello.runtime, "hello without a valid key proof");
            return fault_frame(0, frame.counter, FaultCode::Malformed);
        }
        let oscillator = self.flash.clock.oscillator_ms;
        if let Some(lockout) = self.flash.lockout_at(oscillator) {
            tracing::info!(serial = %self.flash.serial, runtime = %hello.runtime, "hello refused: locked out");
            return self.refusal(frame.body, lockout);
        }
        if let Some(binding) = self.flash.binding.clone() {
            let active = self.is_active(binding.session);
            if !binding.is_runtime(&hello.runtime, &hello.runtime_key) {
                if active {
                    tracing::warn!(serial = %self.flash.serial, bound = %binding.runtime, intruder = %hello.runtime, same_id = binding.runtime == hello.runtime, "bind while another runtime is active: shared use");
                    return self.lock(LockoutReason::Shared, frame.body);
                }
                if self.count_rebind() {
                    return self.lock(LockoutReason::TooManyRebinds, frame.body);
                }
                tracing::info!(serial = %self.flash.serial, from = %binding.runtime, to = %hello.runtime, "rebind");
            } else if active && self.count_rebind() {
                return self.lock(LockoutReason::TooManyRebinds, frame.body);
            }
        }
        self.open_session(hello, frame.body)
    }

    /// Records a rebind; true when it exceeds the policy.
    fn count_rebind(&mut self) -> bool {
        let oscillator = self.flash.clock.oscillator_ms;
        let window = self.flash.policy.rebind_window_ms;
        self.flash
            .rebinds
            .retain(|at| oscillator.saturating_sub(*at) < window);
        self.flash.rebinds.push(oscillator);
        self.flash_dirty = true;
        self.flash.rebinds.len() > self.flash.policy.max_rebinds as usize
    }

    fn lock(&mut self, reason: LockoutReason, hello_body: &[u8]) -> Vec<u8> {
        let lockout = Lockout {
            reason,
            since_ms: self.flash.clock.oscillator_ms,
            until_ms: self
                .flash
                .clock
                .oscillator_ms
                .saturating_add(self.flash.policy.lockout_ms),
        };
        tracing::warn!(serial = %self.flash.serial, reason = reason.reason_code(), until_ms = lockout.until_ms, "dongle locked out");
        self.flash.lockout = Some(lockout);
        self.flash.binding = None;
        self.flash.rebinds.clear();
        self.flash_dirty = true;
        for session in self.sessions.values_mut() {
            session.accesses.clear();
        }
        self.refusal(hello_body, lockout)
    }

    fn refusal(&self, hello_body: &[u8], lockout: Lockout) -> Vec<u8> {
        let transcript =
            handshake::refusal_transcript(hello_body, &lockout, &self.flash.certificate);
        let body = RefusedBody {
            lockout,
            certificate: self.flash.certificate.clone(),
            signature: self.flash.device_key().sign(&transcript).to_bytes(),
        };
        let body = postcard::to_allocvec(&body).unwrap_or_default();
        Frame {
            kind: FrameKind::HelloRefused,
            session: 0,
            counter: 0,
            body: &body,
        }
        .encode()
    }

    fn open_session(&mut self, hello: HelloBody, hello_body: &[u8]) -> Vec<u8> {
        self.flash.session_counter = self.flash.session_counter.wrapping_add(1);
        if self.flash.session_counter as u32 == 0 {
            self.flash.session_counter = self.flash.session_counter.wrapping_add(1);
        }
        let id = self.flash.session_counter as u32;
        let (secret, next_pool) = handshake::device_ephemeral(
            &self.flash.entropy_pool,
            self.flash.session_counter,
            hello_body,
        );
        self.flash.entropy_pool = next_pool;
        self.flash_dirty = true;
        let secret = StaticSecret::from(secret);
        let ephemeral = PublicKey::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&PublicKey::from(hello.ephemeral));
        if !shared.was_contributory() {
            return fault_frame(0, 0, FaultCode::Malformed);
        }
        let transcript =
            handshake::accept_transcript(hello_body, id, &ephemeral, &self.flash.certificate);
        let signature = self.flash.device_key().sign(&transcript).to_bytes();
        let oscillator = self.flash.clock.oscillator_ms;
        tracing::info!(serial = %self.flash.serial, runtime = %hello.runtime, session = id, "bound");
        self.sessions.insert(
            id,
            LiveSession {
                runtime: hello.runtime.clone(),
                keys: SessionKeys::derive(shared.as_bytes(), &transcript),
                next_counter: 0,
                last_frame_ms: oscillator,
                closed: false,
                accesses: BTreeMap::new(),
                next_handle: 1,
            },
        );
        self.flash.binding = Some(Binding {
            runtime: hello.runtime,
            runtime_key: hello.runtime_key,
            session: id,
            bound_at_ms: oscillator,
        });
        self.forget_old_sessions(id);
        let body = AcceptBody {
            ephemeral,
            certificate: self.flash.certificate.clone(),
            signature,
        };
        let body = postcard::to_allocvec(&body).unwrap_or_default();
        Frame {
            kind: FrameKind::HelloAccept,
            session: id,
            counter: 0,
            body: &body,
        }
        .encode()
    }

    fn forget_old_sessions(&mut self, keep: u32) {
        while self.sessions.len() > ACTIVE_SESSIONS_KEPT {
            let oldest = self
                .sessions
                .iter()
                .filter(|(id, _)| **id != keep)
                .min_by_key(|(_, session)| session.last_frame_ms)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => {
                    self.sessions.remove(&id);
                }
                None => break,
            }
        }
    }

    fn handle_request(&mut self, frame: &Frame<'_>) -> Vec<u8> {
        let Some(session) = self.sessions.get_mut(&frame.session) else {
            return fault_frame(frame.session, frame.counter, FaultCode::UnknownSession);
        };
        let Some(plaintext) = handshake::open_frame(&session.keys.to_device, frame) else {
            return fault_frame(
                frame.session,
                frame.counter,
                FaultCode::AuthenticationFailed,
            );
        };
        // From here the request is the session's own: its faults are authenticated, so the
        // runtime can tell them from forged ones.
        if frame.counter < session.next_counter {
            tracing::warn!(
                session = frame.session,
                counter = frame.counter,
                "replayed frame refused"
            );
            return session
                .keys
                .fault_frame(frame.session, frame.counter, FaultCode::Replayed);
        }
        if frame.counter > session.next_counter {
            tracing::warn!(
                session = frame.session,
                counter = frame.counter,
                "out-of-order frame refused"
            );
            return session
                .keys
                .fault_frame(frame.session, frame.counter, FaultCode::OutOfOrder);
        }
        session.next_counter += 1;
        let Some(request) = decode_exact::<Request>(&plaintext) else {
            return session
                .keys
                .fault_frame(frame.session, frame.counter, FaultCode::Malformed);
        };
        let oscillator = self.flash.clock.oscillator_ms;
        let bound_here = self
            .flash
            .binding
            .as_ref()
            .is_some_and(|binding| binding.session == frame.session);
        let reply = if let Some(lockout) = self.flash.lockout_at(oscillator) {
            DeviceReply::Locked(lockout)
        } else if !bound_here {
            if let Some(session) = self.sessions.get_mut(&frame.session) {
                session.accesses.clear();
            }
            DeviceReply::BindingBroken
        } else {
            DeviceReply::Answer(self.execute(frame.session, request))
        };
        let plaintext = postcard::to_allocvec(&reply).unwrap_or_default();
        match self.sessions.get(&frame.session) {
            Some(session) => handshake::seal_frame(
                &session.keys.to_host,
                FrameKind::Response,
                frame.session,
                frame.counter,
                &plaintext,
            ),
            None => fault_frame(frame.session, frame.counter, FaultCode::UnknownSession),
        }
    }

    fn execute(&mut self, session_id: u32, request: Request) -> Response {
        let oscillator = self.flash.clock.oscillator_ms;
        let clock_ms = self.flash.clock.now_ms();
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return Response::Denied(Denial::UnknownHandle);
        };
        session.last_frame_ms = oscillator;
        session.closed = false;
        match request {
            Request::ListItems => Response::Items {
                now_ms: clock_ms,
                items: self.flash.items.clone(),
            },
            Request::Access { firm, code } => {
                let Some(item) = self.flash.item(firm, code) else {
                    return Response::Denied(Denial::UnknownItem);
                };
                if item.is_expired(clock_ms) {
                    return Response::Denied(Denial::Expired);
                }
                if item.units == Some(0) {
                    return Response::Denied(Denial::UnitsExhausted { remaining: 0 });
                }
                let handle = session.next_handle;
                session.next_handle = session.next_handle.wrapping_add(1).max(1);
                session.accesses.insert(handle, (firm, code));
                Response::Granted {
                    handle,
                    item: item.clone(),
                }
            }
            Request::Release { handle } => match session.accesses.remove(&handle) {
                Some(_) => Response::Released,
                None => Response::Denied(Denial::UnknownHandle),
            },
            Request::DecrementUnits { firm, code, units } => {
                let Some(item) = self.flash.item_mut(firm, code) else {
                    return Response::Denied(Denial::UnknownItem);
                };
                if item.is_expired(clock_ms) {
                    return Response::Denied(Denial::Expired);
                }
                let Some(remaining) = item.units else {
                    return Response::Denied(Denial::NotMetered);
                };
                if remaining < units {
                    return Response::Denied(Denial::UnitsExhausted { remaining });
                }
                item.units = Some(remaining - units);
                self.flash_dirty = true;
                Response::Units {
                    remaining: remaining - units,
                }
            }
            Request::ReadClock => Response::Clock { now_ms: clock_ms },
            Request::SetClock { unix_ms } => match self.flash.clock.set(unix_ms) {
                Ok(()) => {
                    self.flash_dirty = true;
                    Response::Clock {
                        now_ms: self.flash.clock.now_ms(),
                    }
                }
                Err(now_ms) => Response::Denied(Denial::ClockBackwards { now_ms }),
            },
            Request::WitnessStore { head } => {
                let runtime = session.runtime.clone();
                match self.flash.witnesses.get(&runtime) {
                    Some(stored)
                        if head.sequence < stored.sequence
                            || (head.sequence == stored.sequence && head != *stored) =>
                    {
                        Response::Denied(Denial::WitnessConflict { stored: *stored })
                    }
                    _ => {
                        self.flash.witnesses.insert(runtime, head);
                        self.flash_dirty = true;
                        Response::WitnessStored
                    }
                }
            }
            Request::WitnessGet { runtime } => Response::Witness(self.flash.witness(&runtime)),
            Request::Close => {
                session.closed = true;
                session.accesses.clear();
                Response::Closed
            }
        }
    }
}

/// Decodes a postcard message that must use every byte.
pub(crate) fn decode_exact<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Some(value),
        _ => None,
    }
}

/// One connection to the dongle (one USB host, one socket): reassembles its reports.
#[derive(Debug, Default)]
pub struct DevicePort {
    assembler: ReportAssembler,
}

impl DevicePort {
    /// A port with nothing received.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one 64-byte report from this connection; returns the reply reports, if a frame
    /// completed (a fault frame when the reports were malformed).
    pub fn receive_report(
        &mut self,
        firmware: &mut Firmware,
        report: &[u8],
        now_ms: u64,
    ) -> Vec<Report> {
        let frame = match self.assembler.push(report) {
            Ok(Some(frame)) => firmware.handle_frame(&frame, now_ms),
            Ok(None) => return Vec::new(),
            Err(error) => {
                tracing::debug!(%error, "malformed report");
                fault_frame(0, 0, FaultCode::Malformed)
            }
        };
        encode_reports(&frame).unwrap_or_default()
    }
}

/// Whether a hello's key signed it (strict Ed25519).
fn proves_its_key(hello: &HelloBody) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(&hello.runtime_key) else {
        return false;
    };
    let message =
        handshake::hello_proof(hello.runtime.as_str(), &hello.ephemeral, &hello.runtime_key);
    key.verify_strict(&message, &Signature::from_bytes(&hello.proof))
        .is_ok()
}
