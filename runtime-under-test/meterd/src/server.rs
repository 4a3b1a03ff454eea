//! The network server: remote stations over TLS, counted by this runtime's allocation table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::daemon::Runtime;
use crate::frame;
use crate::protocol::{FromServer, ToServer};

/// Default TCP port of the network server.
pub const DEFAULT_PORT: u16 = 22350;

/// Accepts remote stations until the listener fails.
pub async fn serve(runtime: Arc<Runtime>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let sweeper = Arc::clone(&runtime);
    tokio::spawn(async move {
        let period = (sweeper.settings.keepalive / 4).max(Duration::from_millis(20));
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            sweeper.sweep_unreconnected().await;
        }
    });
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let runtime = Arc::clone(&runtime);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
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
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(window, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut framed = frame::framed(tls);
    let hello: ToServer = tokio::time::timeout(window, frame::recv(&mut framed))
        .await
        .map_err(|_| "no hello within the keepalive window".to_owned())?
        .map_err(|e| format!("bad hello: {e} ({})", source_of(&e)))?;
    let ToServer::Hello {
        runtime: runtime_id,
        machine,
        claims,
    } = hello
    else {
        return Err("first frame was not a hello".into());
    };
    let peer_text = peer.to_string();
    let (events, mut events_rx) = mpsc::unbounded_channel::<FromServer>();
    let (generation, welcome) = runtime
        .remote_hello(&runtime_id, &machine, &peer_text, claims)
        .await;
    frame::send(&mut framed, &welcome)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = framed.split();
    let writer = tokio::spawn(async move {
        while let Some(message) = events_rx.recv().await {
            let bytes = frame::encode(&message)?;
            sink.feed(bytes).await?;
            while let Ok(more) = events_rx.try_recv() {
                sink.feed(frame::encode(&more)?).await?;
            }
            sink.flush().await?;
        }
        Ok::<_, frame::FrameError>(())
    });
    let why = loop {
        let deadline = Instant::now() + window;
        let incoming = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) if crate::weakened::is(crate::weakened::Defence::KeepaliveRelease) => continue,
            Err(_) => break format!("missed the keepalive window of {window:?}"),
            Ok(None) => break "connection closed".to_owned(),
            Ok(Some(Err(e))) => break format!("bad frame: {e}"),
            Ok(Some(Ok(bytes))) => bytes,
        };
        let message: ToServer = match frame::decode(&incoming) {
            Ok(message) => message,
            Err(e) => break format!("malformed frame: {}", source_of(&e)),
        };
        match message {
            ToServer::Keepalive => {}
            ToServer::Hello { .. } => break "second hello".to_owned(),
            ToServer::Access { request, claim } => {
                let runtime = Arc::clone(&runtime);
                let events = events.clone();
                let runtime_id = runtime_id.clone();
                let peer_text = peer_text.clone();
                tokio::spawn(async move {
                    let answer = runtime
                        .remote_access(&runtime_id, generation, &peer_text, request, claim)
                        .await;
                    let _ = events.send(answer);
                });
            }
            ToServer::Release { request, handle } => {
                let runtime = Arc::clone(&runtime);
                let events = events.clone();
                let runtime_id = runtime_id.clone();
                tokio::spawn(async move {
                    let answer = runtime.remote_release(&runtime_id, request, handle).await;
                    let _ = events.send(answer);
                });
            }
            ToServer::WitnessReceipts {
                request,
                licence,
                key,
                receipts,
            } => {
                let runtime = Arc::clone(&runtime);
                let events = events.clone();
                tokio::spawn(async move {
                    let answer = runtime
                        .witness_receipts_in(request, &licence, key, receipts)
                        .await;
                    let _ = events.send(answer);
                });
            }
            ToServer::WitnessFetch { request, licence } => {
                let _ = events.send(runtime.witness_chain_out(request, &licence));
            }
        }
    };
    writer.abort();
    runtime.remote_gone(&runtime_id, generation, &why).await;
    Err(why)
}

fn source_of(error: &frame::FrameError) -> String {
    match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}
