//! Length-delimited postcard frames, the wire format of both the local socket and the server.

use bytes::{Bytes, BytesMut};
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

/// Largest frame either side of a network connection accepts; a longer one closes it.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Largest answer from the daemon on the local socket: allocation lists and status grow with
/// the number of licences held on the machine. Requests to the daemon keep [`MAX_FRAME_BYTES`]
/// (a length prefix reserves its buffer, and anybody on the machine may connect).
pub const MAX_LOCAL_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// A broken frame or connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed, or a frame exceeded the size limit.
    #[error("Connection error")]
    Io(
        #[from]
        #[source]
        std::io::Error,
    ),
    /// A frame did not decode as the expected message.
    #[error("Malformed frame")]
    Malformed(#[source] postcard::Error),
    /// A message could not be encoded.
    #[error("Cannot encode message")]
    Encode(#[source] postcard::Error),
    /// The peer closed the connection.
    #[error("Connection closed")]
    Closed,
}

/// The codec used on network connections.
pub fn codec() -> LengthDelimitedCodec {
    codec_with_limit(MAX_FRAME_BYTES)
}

fn codec_with_limit(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// Wraps a network byte stream into frames.
pub fn framed<T: AsyncRead + AsyncWrite>(io: T) -> Framed<T, LengthDelimitedCodec> {
    Framed::new(io, codec())
}

/// Which end of the local socket a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEnd {
    /// meterd: takes small requests, sends answers of any size up to the answer limit.
    Daemon,
    /// A client (`meter`): sends small requests, takes answers up to the answer limit.
    Client,
}

/// Frames on the local socket: requests up to [`MAX_FRAME_BYTES`], answers up to
/// [`MAX_LOCAL_ANSWER_BYTES`].
#[derive(Debug)]
pub struct LocalCodec {
    inbound: LengthDelimitedCodec,
    outbound: LengthDelimitedCodec,
}

impl LocalCodec {
    /// The codec for `end` of the local socket.
    pub fn new(end: LocalEnd) -> Self {
        let (inbound, outbound) = match end {
            LocalEnd::Daemon => (MAX_FRAME_BYTES, MAX_LOCAL_ANSWER_BYTES),
            LocalEnd::Client => (MAX_LOCAL_ANSWER_BYTES, MAX_FRAME_BYTES),
        };
        LocalCodec {
            inbound: codec_with_limit(inbound),
            outbound: codec_with_limit(outbound),
        }
    }
}

impl Decoder for LocalCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        self.inbound.decode(src)
    }
}

impl Encoder<Bytes> for LocalCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        self.outbound.encode(frame, dst)
    }
}

/// Wraps `end` of a local socket into frames.
pub fn local_framed<T: AsyncRead + AsyncWrite>(io: T, end: LocalEnd) -> Framed<T, LocalCodec> {
    Framed::new(io, LocalCodec::new(end))
}

/// Encodes one message.
pub fn encode<M: Serialize>(message: &M) -> Result<Bytes, FrameError> {
    postcard::to_stdvec(message)
        .map(Bytes::from)
        .map_err(FrameError::Encode)
}

/// Decodes one message.
pub fn decode<M: DeserializeOwned>(frame: &[u8]) -> Result<M, FrameError> {
    postcard::from_bytes(frame).map_err(FrameError::Malformed)
}

/// Sends one message.
pub async fn send<M, S>(sink: &mut S, message: &M) -> Result<(), FrameError>
where
    M: Serialize,
    S: Sink<Bytes, Error = std::io::Error> + Unpin,
{
    sink.send(encode(message)?).await?;
    Ok(())
}

/// Receives one message; `Closed` when the peer hung up between frames.
pub async fn recv<M, S>(stream: &mut S) -> Result<M, FrameError>
where
    M: DeserializeOwned,
    S: Stream<Item = Result<bytes::BytesMut, std::io::Error>> + Unpin,
{
    match stream.next().await {
        Some(frame) => decode(&frame?),
        None => Err(FrameError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_sends_large_answers_but_refuses_large_requests() {
        let answer = Bytes::from(vec![7u8; 4 * MAX_FRAME_BYTES]);
        let mut wire = BytesMut::new();
        LocalCodec::new(LocalEnd::Daemon)
            .encode(answer.clone(), &mut wire)
            .unwrap();
        let decoded = LocalCodec::new(LocalEnd::Client)
            .decode(&mut wire)
            .unwrap()
            .unwrap();
        assert_eq!(decoded.freeze(), answer);

        // A client may not send one that large, and the daemon refuses to take one.
        assert!(
            LocalCodec::new(LocalEnd::Client)
                .encode(answer, &mut BytesMut::new())
                .is_err()
        );
        let mut announced = BytesMut::from(&(MAX_LOCAL_ANSWER_BYTES as u32).to_be_bytes()[..]);
        assert!(
            LocalCodec::new(LocalEnd::Daemon)
                .decode(&mut announced)
                .is_err()
        );
        assert!(announced.capacity() < MAX_FRAME_BYTES, "no buffer reserved");
    }
}
