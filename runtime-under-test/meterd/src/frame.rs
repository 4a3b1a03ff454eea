//! Length-delimited postcard frames, the wire format of both the local socket and the server.

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Largest frame either side of a network connection accepts; a longer one closes it.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Largest frame on the local socket, whose answers (allocation lists, status) grow with the
/// number of licences held on the machine.
pub const MAX_LOCAL_FRAME_BYTES: usize = 64 * 1024 * 1024;

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
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

/// Wraps a network byte stream into frames.
pub fn framed<T: AsyncRead + AsyncWrite>(io: T) -> Framed<T, LengthDelimitedCodec> {
    Framed::new(io, codec())
}

/// Wraps a local socket into frames.
pub fn local_framed<T: AsyncRead + AsyncWrite>(io: T) -> Framed<T, LengthDelimitedCodec> {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_LOCAL_FRAME_BYTES)
        .new_codec();
    Framed::new(io, codec)
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
