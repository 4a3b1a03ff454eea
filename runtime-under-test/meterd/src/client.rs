//! A connection to the local meterd, as `meter` and apps use it.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

use crate::frame::{self, FrameError};
use crate::protocol::{LocalReply, LocalRequest};

/// A failure talking to meterd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("Cannot reach meterd at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("Lost the connection to meterd")]
    Frame(
        #[from]
        #[source]
        FrameError,
    ),
}

/// One connection to meterd.
#[derive(Debug)]
pub struct LocalClient {
    framed: Framed<UnixStream, frame::LocalCodec>,
}

impl LocalClient {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Ok(LocalClient {
            framed: frame::local_framed(stream, frame::LocalEnd::Client),
        })
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&mut self, request: &LocalRequest) -> Result<LocalReply, ClientError> {
        frame::send(&mut self.framed, request).await?;
        loop {
            let reply: LocalReply = frame::recv(&mut self.framed).await?;
            // A revocation may overtake the reply on a connection that holds licences.
            if !matches!(reply, LocalReply::Revoked { .. }) {
                return Ok(reply);
            }
        }
    }

    /// Waits for the next event (revocation) on this connection.
    pub async fn next_event(&mut self) -> Result<LocalReply, ClientError> {
        match self.framed.next().await {
            Some(frame) => Ok(frame::decode(&frame.map_err(FrameError::from)?)?),
            None => Err(FrameError::Closed.into()),
        }
    }
}
