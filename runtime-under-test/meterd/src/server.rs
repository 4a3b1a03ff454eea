//! The network server: remote stations over TLS, counted by this runtime's allocation table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::connection_limits::ConnectionLimits;
use crate::daemon::Runtime;
use crate::frame;
use crate::protocol::{FromServer, ToServer};
use crate::remote_stations::{Departure, HelloAnswer};

/// Default TCP port of the network server.
pub const DEFAULT_PORT: u16 = 22350;

/// How long a new connection may take to finish TLS and say hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Most requests of one connection answered at once; further frames wait unread.
const MAX_IN_FLIGHT: usize = 64;

/// Accepts remote stations until the listener fails, holding at most `max_connections`.
pub async fn serve(
    runtime: Arc<Runtime>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    max_connections: usize,
) {
    let acceptor = TlsAcceptor::from(tls);
    let sweeper = Arc::clone(&runtime);
    tokio::spawn(async move {
        let period = (sweeper.settings.keepalive / 10)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            sweeper.sweep_unreconnected().await;
        }
    });
    let limits = ConnectionLimits::new(
        !crate::weakened::is(crate::weakened::Defence::ConnectionLimits),
        max_connections,
    );
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let Some(admitted) = limits.admit(peer.ip()) else {
                    // Refused at once: closing costs the peer nothing and us one descriptor
                    // for a moment.
                    limits.note_refusal(peer);
                    drop(tcp);
                    continue;
                };
                let runtime = Arc::clone(&runtime);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _admitted = admitted;
                    if let Err(why) = serve_station(runtime, acceptor, tcp, peer).await {
                        tracing::info!(%peer, why, "Remote connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_station(
    runtime: Arc<Runtime>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let window = runtime.settings.keepalive;
    let hello_deadline = if crate::weakened::is(crate::weakened::Defence::ConnectionLimits) {
        window * 2
    } else {
        HELLO_DEADLINE.min(window.max(Duration::from_secs(1)))
    };
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let opened = tokio::time::timeout(hello_deadline, async {
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let fingerprint = crate::tls::client_fingerprint(tls.get_ref().1)
            .ok_or_else(|| "no client certificate".to_owned())?;
        let mut framed = frame::framed(tls);
        let hello: ToServer = frame::recv(&mut framed)
            .await
            .map_err(|e| format!("bad hello: {e} ({})", source_of(&e)))?;
        Ok::<_, String>((framed, fingerprint, hello))
    })
    .await
    .map_err(|_| format!("no hello within {hello_deadline:?}"))?;
    let (mut framed, fingerprint, hello) = opened?;
    let ToServer::Hello {
        runtime: runtime_id,
        machine,
        claims,
    } = hello
    else {
        return Err("first frame was not a hello".into());
    };
    let (generation, welcome, events) = match runtime
        .remote_hello(&runtime_id, &fingerprint, &machine, peer, claims)
        .await
    {
        HelloAnswer::Welcomed {
            generation,
            welcome,
            events,
        } => (generation, welcome, events),
        HelloAnswer::Refused(refusal) => {
            let _ = frame::send(&mut framed, &refusal).await;
            return Err(format!("hello refused: {refusal:?}"));
        }
    };
    frame::send(&mut framed, &welcome)
        .await
        .map_err(|e| e.to_string())?;
    let peer_text = peer.to_string();
    let station = Station {
        runtime: &runtime,
        runtime_id: &runtime_id,
        generation,
        peer: &peer_text,
    };
    Err(station.serve(&mut framed, events, window).await)
}

/// One linked client runtime, as its connection's requests see it.
struct Station<'a> {
    runtime: &'a Arc<Runtime>,
    runtime_id: &'a str,
    generation: u64,
    peer: &'a str,
}

impl Station<'_> {
    /// Answers the station's requests until its connection ends, then releases the station;
    /// returns why the connection ended.
    ///
    /// Everything happens in the connection's own task: requests being answered are polled here
    /// side by side (no task per request, no channel to a writer task), and every answer that is
    /// ready is queued before one flush, so a busy connection sends several answers per write.
    async fn serve(
        &self,
        framed: &mut Link,
        mut events: mpsc::UnboundedReceiver<FromServer>,
        window: Duration,
    ) -> String {
        let mut answering = FuturesUnordered::new();
        let silence = tokio::time::sleep(window);
        tokio::pin!(silence);
        let mut departure = Departure::Closed {
            last_heard: std::time::Instant::now(),
        };
        let why = loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => {
                    let sent = tokio::time::timeout(window, frame::send(framed, &event)).await;
                    match sent {
                        // A triad member that stopped leading lets its stations go.
                        Ok(Ok(())) if matches!(event, FromServer::Refused { .. }) => {
                            break "sent to the triad's leader".to_owned();
                        }
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break format!("cannot send: {e}"),
                        Err(_) => break format!("frames not read within the keepalive window of {window:?}"),
                    }
                }
                Some(answer) = answering.next(), if !answering.is_empty() => {
                    let sent = tokio::time::timeout(window, async {
                        let mut ends = queue(framed, &answer).await?;
                        while let Some(Some(more)) = answering.next().now_or_never() {
                            ends |= queue(framed, &more).await?;
                        }
                        SinkExt::<bytes::Bytes>::flush(framed).await?;
                        Ok::<_, frame::FrameError>(ends)
                    })
                    .await;
                    match sent {
                        Ok(Ok(true)) => break "sent to the triad's leader".to_owned(),
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => break format!("cannot answer: {e}"),
                        // A station that stops reading its answers is as gone as a silent one.
                        Err(_) => break format!("answers not read within the keepalive window of {window:?}"),
                    }
                }
                incoming = framed.next(), if answering.len() < MAX_IN_FLIGHT => {
                    let heard = Instant::now();
                    departure = Departure::Closed { last_heard: heard.into_std() };
                    silence.as_mut().reset(heard + window);
                    let bytes = match incoming {
                        None => break "connection closed".to_owned(),
                        Some(Err(e)) => break format!("bad frame: {e}"),
                        Some(Ok(bytes)) => bytes,
                    };
                    let message: ToServer = match frame::decode(&bytes) {
                        Ok(message) => message,
                        Err(e) => break format!("malformed frame: {}", source_of(&e)),
                    };
                    match message {
                        ToServer::Hello { .. } => break "second hello".to_owned(),
                        other => answering.push(self.answer(other)),
                    }
                }
                () = &mut silence => {
                    if crate::weakened::is(crate::weakened::Defence::KeepaliveRelease) {
                        silence.as_mut().reset(Instant::now() + window);
                        continue;
                    }
                    departure = Departure::Silent;
                    break format!("missed the keepalive window of {window:?}");
                }
            }
        };
        // Requests already being answered run to their end, as they would in tasks of their own
        // (an access must not stop between its steps), while the station is released.
        let finish = async { while answering.next().await.is_some() {} };
        tokio::join!(
            finish,
            self.runtime
                .remote_gone(self.runtime_id, self.generation, departure, &why)
        );
        why
    }

    /// The answer to one request (it may wait for the machine, the disk, a dongle); `None` for
    /// the messages nobody answers.
    async fn answer(&self, message: ToServer) -> Option<FromServer> {
        let runtime = self.runtime;
        let answer = match message {
            ToServer::Access { request, claim } => {
                runtime
                    .remote_access(self.runtime_id, self.generation, self.peer, request, claim)
                    .await
            }
            ToServer::Release { request, handle } => {
                runtime
                    .remote_release(self.runtime_id, request, handle)
                    .await
            }
            ToServer::WitnessReceipts {
                request,
                licence,
                key,
                receipts,
            } => {
                runtime
                    .witness_receipts_in(request, self.runtime_id, &licence, key, receipts)
                    .await
            }
            ToServer::WitnessFetch {
                request,
                licence,
                key,
                from,
            } => runtime.witness_chain_out(request, self.runtime_id, &licence, &key, from),
            // A triad member answers once the triad renewed the runtime's seats; one that cannot
            // renew them sends the runtime to the leader.
            ToServer::Keepalive { seq } => {
                if runtime.renew_triad_seats(self.runtime_id).await {
                    FromServer::KeepaliveAck { seq }
                } else {
                    FromServer::Refused {
                        reason: meter_core::reason::Reason::ServerUnreachable,
                    }
                }
            }
            ToServer::Hello { .. } => return None,
        };
        Some(answer)
    }
}

/// A server-side connection: frames over TLS over TCP.
type Link = Framed<TlsStream<TcpStream>, LengthDelimitedCodec>;

/// Queues one answer in the connection's write buffer (written at the next flush, or sooner
/// when the buffer is full); true when it ends the connection (a refusal).
async fn queue(framed: &mut Link, answer: &Option<FromServer>) -> Result<bool, frame::FrameError> {
    if let Some(answer) = answer {
        framed.feed(frame::encode(answer)?).await?;
        return Ok(matches!(answer, FromServer::Refused { .. }));
    }
    Ok(false)
}

fn source_of(error: &frame::FrameError) -> String {
    match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}
