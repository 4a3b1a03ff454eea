//! Handshake transcripts, key derivation and frame sealing shared by both ends.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use crate::certificate::DeviceCertificate;
use crate::flash::Lockout;
use crate::wire::{self, FaultCode, Frame, FrameKind};

const ACCEPT_LABEL: &[u8] = b"vigil-dongle-accept-v1";
const HELLO_LABEL: &[u8] = b"vigil-dongle-hello-v1";
const REFUSAL_LABEL: &[u8] = b"vigil-dongle-refusal-v1";
const KEY_SALT_LABEL: &[u8] = b"vigil-dongle-keys-v1";

/// What a runtime's key signs in its hello: its id, its ephemeral key and the key itself. A
/// replayed hello opens a session nobody can use (its ephemeral secret stays with its maker).
pub(crate) fn hello_proof(runtime: &str, ephemeral: &[u8; 32], runtime_key: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(HELLO_LABEL);
    hash.update((runtime.len() as u32).to_le_bytes());
    hash.update(runtime.as_bytes());
    hash.update(ephemeral);
    hash.update(runtime_key);
    hash.finalize().into()
}

/// The hash both ends sign/verify and derive keys from when a session opens.
pub(crate) fn accept_transcript(
    hello_body: &[u8],
    session: u32,
    device_ephemeral: &[u8; 32],
    certificate: &DeviceCertificate,
) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(ACCEPT_LABEL);
    hash.update((hello_body.len() as u32).to_le_bytes());
    hash.update(hello_body);
    hash.update(session.to_le_bytes());
    hash.update(device_ephemeral);
    hash.update(certificate_bytes(certificate));
    hash.finalize().into()
}

/// The hash the dongle signs when it refuses a hello.
pub(crate) fn refusal_transcript(
    hello_body: &[u8],
    lockout: &Lockout,
    certificate: &DeviceCertificate,
) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(REFUSAL_LABEL);
    hash.update((hello_body.len() as u32).to_le_bytes());
    hash.update(hello_body);
    hash.update(postcard::to_allocvec(lockout).unwrap_or_default());
    hash.update(certificate_bytes(certificate));
    hash.finalize().into()
}

fn certificate_bytes(certificate: &DeviceCertificate) -> Vec<u8> {
    postcard::to_allocvec(certificate).unwrap_or_default()
}

/// The two AEAD keys of a session, one per direction, and the key that authenticates the
/// dongle's faults.
pub(crate) struct SessionKeys {
    pub to_device: ChaCha20Poly1305,
    pub to_host: ChaCha20Poly1305,
    fault_key: [u8; 32],
}

/// Length of the tag that authenticates a fault within a session.
const FAULT_TAG_LEN: usize = 32;

impl SessionKeys {
    /// Derives both keys from the X25519 shared secret and the transcript hash.
    pub fn derive(shared_secret: &[u8; 32], transcript: &[u8; 32]) -> Self {
        let mut salt = Vec::with_capacity(KEY_SALT_LABEL.len() + 32);
        salt.extend_from_slice(KEY_SALT_LABEL);
        salt.extend_from_slice(transcript);
        let hkdf = Hkdf::<Sha256>::new(Some(&salt), shared_secret);
        let mut fault_key = [0u8; 32];
        expand(&hkdf, b"dongle faults", &mut fault_key);
        Self {
            to_device: cipher(&hkdf, b"runtime to dongle"),
            to_host: cipher(&hkdf, b"dongle to runtime"),
            fault_key,
        }
    }

    /// A fault frame of this session, its code followed by a tag only the two ends can make
    /// (HMAC-SHA256 over the header and the code, as HKDF-Expand computes it): no nonce, so a
    /// fault for a counter already answered reuses nothing.
    pub fn fault_frame(&self, session: u32, counter: u64, fault: FaultCode) -> Vec<u8> {
        let mut body = vec![fault.code()];
        body.extend_from_slice(&self.fault_tag(session, counter, fault.code()));
        Frame {
            kind: FrameKind::Fault,
            session,
            counter,
            body: &body,
        }
        .encode()
    }

    /// The fault a fault frame of this session carries, if its tag authenticates it.
    pub fn authenticated_fault(&self, frame: &Frame<'_>) -> Option<FaultCode> {
        let (code, tag) = frame.body.split_first()?;
        let expected = self.fault_tag(frame.session, frame.counter, *code);
        let equal = tag.len() == FAULT_TAG_LEN
            && tag
                .iter()
                .zip(expected.iter())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
        if equal {
            FaultCode::from_code(*code)
        } else {
            None
        }
    }

    fn fault_tag(&self, session: u32, counter: u64, code: u8) -> [u8; FAULT_TAG_LEN] {
        let mut info = wire::header(FrameKind::Fault, session, counter).to_vec();
        info.push(code);
        let mut tag = [0u8; FAULT_TAG_LEN];
        let prf = Hkdf::<Sha256>::from_prk(&self.fault_key).unwrap_or_else(|_| {
            unreachable!("a 32-byte key is a valid HKDF-SHA256 pseudorandom key")
        });
        if prf.expand(&info, &mut tag).is_err() {
            unreachable!("HKDF-SHA256 expands 32 bytes");
        }
        tag
    }
}

fn cipher(hkdf: &Hkdf<Sha256>, info: &[u8]) -> ChaCha20Poly1305 {
    let mut key = [0u8; 32];
    expand(hkdf, info, &mut key);
    ChaCha20Poly1305::new(&Key::from(key))
}

fn expand(hkdf: &Hkdf<Sha256>, info: &[u8], out: &mut [u8; 32]) {
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit, so expansion cannot fail.
    if hkdf.expand(info, out).is_err() {
        unreachable!("HKDF-SHA256 expands 32 bytes");
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&counter.to_le_bytes());
    Nonce::from(nonce)
}

/// Encrypts `plaintext` into a frame, authenticating the header.
pub(crate) fn seal_frame(
    cipher: &ChaCha20Poly1305,
    kind: FrameKind,
    session: u32,
    counter: u64,
    plaintext: &[u8],
) -> Vec<u8> {
    let header = wire::header(kind, session, counter);
    let sealed = cipher
        .encrypt(
            &nonce(counter),
            Payload {
                msg: plaintext,
                aad: &header,
            },
        )
        .unwrap_or_default();
    let mut frame = Vec::with_capacity(header.len() + sealed.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&sealed);
    frame
}

/// Decrypts a frame's body; `None` if it does not authenticate.
pub(crate) fn open_frame(cipher: &ChaCha20Poly1305, frame: &Frame<'_>) -> Option<Vec<u8>> {
    cipher
        .decrypt(
            &nonce(frame.counter),
            Payload {
                msg: frame.body,
                aad: &frame.header(),
            },
        )
        .ok()
}

/// The dongle's ephemeral secret for one hello, and the next entropy pool.
pub(crate) fn device_ephemeral(
    pool: &[u8; 32],
    session_counter: u64,
    hello_body: &[u8],
) -> ([u8; 32], [u8; 32]) {
    let mut ikm = Vec::with_capacity(8 + hello_body.len());
    ikm.extend_from_slice(&session_counter.to_le_bytes());
    ikm.extend_from_slice(hello_body);
    let hkdf = Hkdf::<Sha256>::new(Some(pool), &ikm);
    let mut secret = [0u8; 32];
    let mut next_pool = [0u8; 32];
    expand(&hkdf, b"device ephemeral", &mut secret);
    expand(&hkdf, b"next pool", &mut next_pool);
    (secret, next_pool)
}

/// Stirs outside entropy into the pool.
pub(crate) fn mix_entropy(pool: &[u8; 32], entropy: &[u8]) -> [u8; 32] {
    let hkdf = Hkdf::<Sha256>::new(Some(pool), entropy);
    let mut next = [0u8; 32];
    expand(&hkdf, b"mixed pool", &mut next);
    next
}
