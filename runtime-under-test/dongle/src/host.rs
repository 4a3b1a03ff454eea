//! The runtime's side of a dongle session: hello, verify, then encrypted request/response.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::certificate::CertificateError;
use crate::firmware::decode_exact;
use crate::flash::{LockoutReason, RuntimeId, Serial};
use crate::handshake::{self, SessionKeys};
use crate::protocol::{AcceptBody, DeviceReply, HelloBody, RefusedBody, Request, Response};
use crate::wire::{FaultCode, Frame, FrameError, FrameKind, MAX_FRAME_LEN};

/// Who the dongle proved to be during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DongleIdentity {
    /// Serial from the vendor certificate.
    pub serial: Serial,
    /// The device key that signed the handshake.
    pub device_key: VerifyingKey,
    /// The vendor key that certified the device key.
    pub vendor_key: VerifyingKey,
}

/// A session failure; [`SessionError::is_fatal`] says whether the session is over.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Bytes that are not a frame (ignored; the session goes on).
    #[error("Not a dongle frame")]
    Frame(#[from] FrameError),
    /// A frame of the wrong kind for this point of the protocol (ignored).
    #[error("Unexpected {0:?} frame")]
    UnexpectedFrame(FrameKind),
    /// A frame for another session (ignored).
    #[error("Frame for session {got}, this is session {expected}")]
    WrongSession {
        /// This session.
        expected: u32,
        /// The frame's session.
        got: u32,
    },
    /// A response that does not authenticate (ignored).
    #[error("Response failed authentication")]
    AuthenticationFailed,
    /// A response whose counter was already seen (ignored).
    #[error("Replayed response {got}, expected {expected}")]
    Replayed {
        /// Awaited counter.
        expected: u64,
        /// Received counter.
        got: u64,
    },
    /// A response whose counter is ahead (ignored).
    #[error("Response {got} out of order, expected {expected}")]
    OutOfOrder {
        /// Awaited counter.
        expected: u64,
        /// Received counter.
        got: u64,
    },
    /// An authenticated message that does not decode.
    #[error("Malformed message from the dongle")]
    Malformed,
    /// The dongle's vendor certificate was refused.
    #[error("Dongle certificate refused")]
    Certificate(#[source] CertificateError),
    /// The handshake signature does not verify with the certified device key.
    #[error("Dongle handshake signature does not verify")]
    BadSignature(#[source] ed25519_dalek::SignatureError),
    /// The dongle sent a low-order ephemeral key.
    #[error("Dongle sent a weak ephemeral key")]
    WeakKey,
    /// The dongle is locked out.
    #[error("Dongle locked out ({}) until {until_ms}", reason.reason_code())]
    Locked {
        /// Why.
        reason: LockoutReason,
        /// Dongle oscillator time the lockout ends.
        until_ms: u64,
    },
    /// Another runtime bound the dongle; release every licence taken from it.
    #[error("Dongle bound by another runtime")]
    BindingBroken,
    /// The dongle refused a frame: before a session opened, or with the session's own
    /// authentication; the session is over.
    #[error("Dongle fault")]
    Fault(#[source] FaultCode),
    /// A fault frame for the open session that does not authenticate: anyone on the link could
    /// have sent it (ignored; a dongle that really lost the session stops answering, and the
    /// request times out).
    #[error("Unauthenticated dongle fault ignored")]
    UnauthenticatedFault(#[source] FaultCode),
    /// The session is not open (not yet, or no more).
    #[error("Session not open")]
    NotOpen,
    /// The handshake is already done.
    #[error("Session already past its handshake")]
    NotAwaitingAccept,
    /// Only one request may be outstanding.
    #[error("A request is already outstanding")]
    RequestOutstanding,
    /// A response arrived with no request outstanding (ignored).
    #[error("No request outstanding")]
    NoRequestOutstanding,
    /// The request does not fit in a frame.
    #[error("Request too large for a frame")]
    TooLarge,
}

impl SessionError {
    /// Whether the session is over (the runtime must release and, if it can, say hello again).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Self::Frame(_)
                | Self::UnauthenticatedFault(_)
                | Self::UnexpectedFrame(_)
                | Self::WrongSession { .. }
                | Self::AuthenticationFailed
                | Self::Replayed { .. }
                | Self::OutOfOrder { .. }
                | Self::NotOpen
                | Self::NotAwaitingAccept
                | Self::RequestOutstanding
                | Self::NoRequestOutstanding
                | Self::TooLarge
        )
    }

    /// The runtime contract's reason code, where one applies.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            Self::Locked { reason, .. } => Some(reason.reason_code()),
            Self::BindingBroken => Some("binding-broken"),
            Self::Certificate(_) | Self::BadSignature(_) => Some("signature-invalid"),
            _ => None,
        }
    }
}

enum State {
    AwaitingAccept {
        secret: StaticSecret,
        hello_body: Vec<u8>,
    },
    Open {
        id: u32,
        keys: SessionKeys,
        next_counter: u64,
        outstanding: Option<u64>,
    },
    Ended,
}

/// A runtime's session with one dongle; sans-IO: frames in, frames out.
pub struct Session {
    runtime: RuntimeId,
    trusted_vendors: Vec<VerifyingKey>,
    state: State,
    dongle: Option<DongleIdentity>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::AwaitingAccept { .. } => "awaiting-accept",
            State::Open { .. } => "open",
            State::Ended => "ended",
        };
        f.debug_struct("Session")
            .field("runtime", &self.runtime)
            .field("id", &self.id())
            .field("state", &state)
            .field("dongle", &self.dongle.as_ref().map(|dongle| dongle.serial))
            .finish()
    }
}

impl Session {
    /// Starts a session; returns it and the hello frame to send. `ephemeral_secret` must be 32
    /// fresh random bytes; `runtime_key` is the runtime's own key, which signs the hello (the
    /// dongle tells runtimes apart by id and key).
    pub fn start(
        runtime: RuntimeId,
        runtime_key: &SigningKey,
        ephemeral_secret: [u8; 32],
        trusted_vendors: Vec<VerifyingKey>,
    ) -> (Self, Vec<u8>) {
        let secret = StaticSecret::from(ephemeral_secret);
        let ephemeral = PublicKey::from(&secret).to_bytes();
        let public = runtime_key.verifying_key().to_bytes();
        let proof = runtime_key
            .sign(&handshake::hello_proof(
                runtime.as_str(),
                &ephemeral,
                &public,
            ))
            .to_bytes();
        let hello = HelloBody {
            runtime: runtime.clone(),
            ephemeral,
            runtime_key: public,
            proof,
        };
        let hello_body = postcard::to_allocvec(&hello).unwrap_or_default();
        let frame = Frame {
            kind: FrameKind::Hello,
            session: 0,
            counter: 0,
            body: &hello_body,
        }
        .encode();
        let session = Self {
            runtime,
            trusted_vendors,
            state: State::AwaitingAccept { secret, hello_body },
            dongle: None,
        };
        (session, frame)
    }

    /// The runtime id this session speaks for.
    pub fn runtime(&self) -> &RuntimeId {
        &self.runtime
    }

    /// The session id, once open.
    pub fn id(&self) -> Option<u32> {
        match self.state {
            State::Open { id, .. } => Some(id),
            _ => None,
        }
    }

    /// True while requests can be sent.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// The dongle's proven identity, once the handshake succeeded.
    pub fn dongle(&self) -> Option<&DongleIdentity> {
        self.dongle.as_ref()
    }

    /// Takes the dongle's answer to the hello. Any failure ends the session.
    pub fn accept(&mut self, bytes: &[u8]) -> Result<DongleIdentity, SessionError> {
        let State::AwaitingAccept { .. } = self.state else {
            return Err(SessionError::NotAwaitingAccept);
        };
        let State::AwaitingAccept { secret, hello_body } =
            std::mem::replace(&mut self.state, State::Ended)
        else {
            return Err(SessionError::NotAwaitingAccept);
        };
        let frame = Frame::decode(bytes)?;
        match frame.kind {
            FrameKind::HelloAccept if frame.session != 0 => {
                let body: AcceptBody = decode_exact(frame.body).ok_or(SessionError::Malformed)?;
                let device_key = body
                    .certificate
                    .verify(&self.trusted_vendors)
                    .map_err(SessionError::Certificate)?;
                let transcript = handshake::accept_transcript(
                    &hello_body,
                    frame.session,
                    &body.ephemeral,
                    &body.certificate,
                );
                device_key
                    .verify_strict(&transcript, &Signature::from_bytes(&body.signature))
                    .map_err(SessionError::BadSignature)?;
                let shared = secret.diffie_hellman(&PublicKey::from(body.ephemeral));
                if !shared.was_contributory() {
                    return Err(SessionError::WeakKey);
                }
                let identity = DongleIdentity {
                    serial: body.certificate.serial,
                    device_key,
                    vendor_key: VerifyingKey::from_bytes(&body.certificate.vendor_key)
                        .map_err(SessionError::BadSignature)?,
                };
                self.state = State::Open {
                    id: frame.session,
                    keys: SessionKeys::derive(shared.as_bytes(), &transcript),
                    next_counter: 0,
                    outstanding: None,
                };
                self.dongle = Some(identity.clone());
                Ok(identity)
            }
            FrameKind::HelloRefused => {
                let body: RefusedBody = decode_exact(frame.body).ok_or(SessionError::Malformed)?;
                let device_key = body
                    .certificate
                    .verify(&self.trusted_vendors)
                    .map_err(SessionError::Certificate)?;
                let transcript =
                    handshake::refusal_transcript(&hello_body, &body.lockout, &body.certificate);
                device_key
                    .verify_strict(&transcript, &Signature::from_bytes(&body.signature))
                    .map_err(SessionError::BadSignature)?;
                Err(SessionError::Locked {
                    reason: body.lockout.reason,
                    until_ms: body.lockout.until_ms,
                })
            }
            FrameKind::Fault => Err(SessionError::Fault(fault_code(frame.body))),
            kind => Err(SessionError::UnexpectedFrame(kind)),
        }
    }

    /// Seals a request into a frame to send; one request at a time.
    pub fn request(&mut self, request: &Request) -> Result<Vec<u8>, SessionError> {
        let State::Open {
            id,
            keys,
            next_counter,
            outstanding,
        } = &mut self.state
        else {
            return Err(SessionError::NotOpen);
        };
        if outstanding.is_some() {
            return Err(SessionError::RequestOutstanding);
        }
        let plaintext = postcard::to_allocvec(request).map_err(|_| SessionError::TooLarge)?;
        let frame = handshake::seal_frame(
            &keys.to_device,
            FrameKind::Request,
            *id,
            *next_counter,
            &plaintext,
        );
        if frame.len() > MAX_FRAME_LEN {
            return Err(SessionError::TooLarge);
        }
        *outstanding = Some(*next_counter);
        *next_counter += 1;
        Ok(frame)
    }

    /// Takes the dongle's reply to the outstanding request. Non-fatal errors (see
    /// [`SessionError::is_fatal`]) leave the request outstanding; fatal ones end the session.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Response, SessionError> {
        let State::Open {
            id,
            keys,
            outstanding,
            ..
        } = &mut self.state
        else {
            return Err(SessionError::NotOpen);
        };
        let frame = Frame::decode(bytes)?;
        if frame.session != *id {
            return Err(SessionError::WrongSession {
                expected: *id,
                got: frame.session,
            });
        }
        let Some(expected) = *outstanding else {
            return Err(SessionError::NoRequestOutstanding);
        };
        match frame.kind {
            FrameKind::Response => {}
            FrameKind::Fault if frame.counter == expected => {
                let Some(fault) = keys.authenticated_fault(&frame) else {
                    return Err(SessionError::UnauthenticatedFault(fault_code(frame.body)));
                };
                self.state = State::Ended;
                return Err(SessionError::Fault(fault));
            }
            kind => return Err(SessionError::UnexpectedFrame(kind)),
        }
        let plaintext = handshake::open_frame(&keys.to_host, &frame)
            .ok_or(SessionError::AuthenticationFailed)?;
        if frame.counter < expected {
            return Err(SessionError::Replayed {
                expected,
                got: frame.counter,
            });
        }
        if frame.counter > expected {
            return Err(SessionError::OutOfOrder {
                expected,
                got: frame.counter,
            });
        }
        *outstanding = None;
        let reply = decode_exact::<DeviceReply>(&plaintext);
        let result = match reply {
            Some(DeviceReply::Answer(Response::Closed)) => {
                self.state = State::Ended;
                return Ok(Response::Closed);
            }
            Some(DeviceReply::Answer(response)) => return Ok(response),
            Some(DeviceReply::BindingBroken) => SessionError::BindingBroken,
            Some(DeviceReply::Locked(lockout)) => SessionError::Locked {
                reason: lockout.reason,
                until_ms: lockout.until_ms,
            },
            None => SessionError::Malformed,
        };
        self.state = State::Ended;
        Err(result)
    }
}

/// The fault code a fault frame names (its first byte; a tag may follow).
fn fault_code(body: &[u8]) -> FaultCode {
    body.first()
        .and_then(|code| FaultCode::from_code(*code))
        .unwrap_or(FaultCode::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::Firmware;
    use crate::flash::Flash;
    use ed25519_dalek::SigningKey;

    fn open_session() -> (Firmware, Session) {
        let vendor = SigningKey::from_bytes(&[1; 32]);
        let mut firmware = Firmware::power_on(
            Flash::manufacture(Serial(5), [2; 32], [3; 32], &vendor),
            1_000,
        );
        let (mut session, hello) = Session::start(
            RuntimeId::new("vm1").unwrap(),
            &SigningKey::from_bytes(&[6; 32]),
            [4; 32],
            vec![vendor.verifying_key()],
        );
        let reply = firmware.handle_frame(&hello, 1_000);
        session.accept(&reply).unwrap();
        (firmware, session)
    }

    /// Seals a request with the session's keys at an arbitrary counter, as an attacker reordering
    /// captured frames (or a buggy host) would present it.
    fn request_at(session: &Session, counter: u64) -> Vec<u8> {
        let State::Open { id, keys, .. } = &session.state else {
            panic!("open session expected")
        };
        let plaintext = postcard::to_allocvec(&Request::ReadClock).unwrap();
        handshake::seal_frame(
            &keys.to_device,
            FrameKind::Request,
            *id,
            counter,
            &plaintext,
        )
    }

    /// The fault a frame carries, checked to authenticate with the session's keys.
    fn fault_of(session: &Session, frame: &[u8]) -> FaultCode {
        let frame = Frame::decode(frame).unwrap();
        assert_eq!(frame.kind, FrameKind::Fault);
        let State::Open { keys, .. } = &session.state else {
            panic!("open session expected")
        };
        keys.authenticated_fault(&frame)
            .expect("a fault within the session is authenticated")
    }

    #[test]
    fn dongle_refuses_reordered_requests() {
        let (mut firmware, session) = open_session();
        let second = request_at(&session, 1);
        let first = request_at(&session, 0);
        assert_eq!(
            fault_of(&session, &firmware.handle_frame(&second, 1_000)),
            FaultCode::OutOfOrder
        );
        let reply = firmware.handle_frame(&first, 1_000);
        assert_eq!(Frame::decode(&reply).unwrap().kind, FrameKind::Response);
        assert_eq!(
            fault_of(&session, &firmware.handle_frame(&first, 1_000)),
            FaultCode::Replayed
        );
        let reply = firmware.handle_frame(&second, 1_000);
        assert_eq!(Frame::decode(&reply).unwrap().kind, FrameKind::Response);
    }

    #[test]
    fn runtime_refuses_responses_ahead_of_its_request() {
        let (_, mut session) = open_session();
        session.request(&Request::ReadClock).unwrap();
        let State::Open { id, keys, .. } = &session.state else {
            panic!("open session expected")
        };
        let reply =
            postcard::to_allocvec(&DeviceReply::Answer(Response::Clock { now_ms: 1 })).unwrap();
        let ahead = handshake::seal_frame(&keys.to_host, FrameKind::Response, *id, 1, &reply);
        let genuine = handshake::seal_frame(&keys.to_host, FrameKind::Response, *id, 0, &reply);
        let error = session.receive(&ahead).unwrap_err();
        assert!(
            matches!(
                error,
                SessionError::OutOfOrder {
                    expected: 0,
                    got: 1
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            session.receive(&genuine).unwrap(),
            Response::Clock { now_ms: 1 }
        );
    }

    #[test]
    fn response_sealed_with_the_request_key_refused() {
        let (_, mut session) = open_session();
        session.request(&Request::ReadClock).unwrap();
        let State::Open { id, keys, .. } = &session.state else {
            panic!("open session expected")
        };
        let reply = postcard::to_allocvec(&DeviceReply::BindingBroken).unwrap();
        let reflected = handshake::seal_frame(&keys.to_device, FrameKind::Response, *id, 0, &reply);
        assert!(matches!(
            session.receive(&reflected),
            Err(SessionError::AuthenticationFailed)
        ));
        assert!(session.is_open());
    }
}
