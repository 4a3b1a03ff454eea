//! The local socket: apps and admins on this machine talk to meterd here.

use std::path::Path;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::daemon::Runtime;
use crate::frame;
use crate::protocol::{LocalReply, LocalRequest};

/// Binds the local socket (replacing a stale one), readable and writable by every local user.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves local connections until the listener fails.
pub async fn serve(runtime: Arc<Runtime>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let runtime = Arc::clone(&runtime);
                tokio::spawn(async move {
                    if let Err(e) = serve_client(runtime, stream).await {
                        tracing::debug!(error = %e, "Local connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Local accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_client(runtime: Arc<Runtime>, stream: UnixStream) -> Result<(), frame::FrameError> {
    let cred = stream.peer_cred()?;
    let pid = cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| std::io::Error::other("peer has no pid"))?;
    let uid = cred.uid();
    let mut framed = frame::local_framed(stream, frame::LocalEnd::Daemon);
    let (events, mut events_rx) = mpsc::unbounded_channel::<LocalReply>();
    let mut granted_here = Vec::new();
    let result = loop {
        tokio::select! {
            incoming = framed.next() => {
                let bytes = match incoming {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(bytes)) => bytes,
                };
                let reply = match frame::decode::<LocalRequest>(&bytes) {
                    Ok(request) => handle(&runtime, pid, uid, request, &events).await,
                    Err(e) => {
                        tracing::info!(pid, error = %e, "Malformed local request");
                        break Err(e);
                    }
                };
                if let LocalReply::Granted { handle, .. } = &reply {
                    granted_here.push(*handle);
                }
                if let Err(e) = frame::send(&mut framed, &reply).await {
                    break Err(e);
                }
            }
            event = events_rx.recv() => {
                if let Some(event) = event
                    && let Err(e) = framed.send(frame::encode(&event)?).await
                {
                    break Err(e.into());
                }
            }
        }
    };
    runtime.forget_listeners(&granted_here, &events);
    result
}

fn error(message: impl Into<String>) -> LocalReply {
    LocalReply::Error {
        message: message.into(),
        reason: None,
    }
}

/// True for root and for the user the daemon runs as.
fn is_admin(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::Uid::effective().as_raw()
}

async fn handle(
    runtime: &Arc<Runtime>,
    pid: u32,
    uid: u32,
    request: LocalRequest,
    events: &mpsc::UnboundedSender<LocalReply>,
) -> LocalReply {
    match request {
        LocalRequest::Access { firm, product } => match runtime.identify(pid, uid) {
            Ok(caller) => {
                runtime
                    .access_local(&caller, firm, product, Some(events.clone()))
                    .await
            }
            Err(e) => error(format!("Cannot identify the calling process {pid}: {e:#}")),
        },
        LocalRequest::Release { handle } => match runtime.release_for(pid, uid, handle).await {
            Ok(()) => LocalReply::Released,
            Err(reason) => LocalReply::Error {
                message: format!("Handle {handle} is not held"),
                reason: Some(reason),
            },
        },
        LocalRequest::Watch { handle } => {
            if runtime.add_listener(handle, uid, events.clone()) {
                LocalReply::Ok
            } else {
                LocalReply::Error {
                    message: format!("Handle {handle} is not held"),
                    reason: Some(meter_core::reason::Reason::NotHeld),
                }
            }
        }
        LocalRequest::Status => {
            runtime.refresh_licences().await;
            LocalReply::Json(runtime.status_json().to_string())
        }
        LocalRequest::List => LocalReply::Json(runtime.list_json().to_string()),
        LocalRequest::MachineInfo => match runtime.machine_info_json() {
            Ok(info) => LocalReply::Json(info.to_string()),
            Err(e) => error(format!("Cannot read the machine: {e:#}")),
        },
        LocalRequest::ServersAdd { addr, pin } => {
            if !is_admin(uid) {
                return error("Only an administrator may change servers");
            }
            match crate::remote::parse_pins(&pin) {
                Ok(pins) => match runtime.remotes.add(runtime, addr, pins) {
                    Ok(()) => persist_servers(runtime).await,
                    Err(e) => error(format!("{:#}", anyhow::Error::from(e))),
                },
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::ServersRemove { addr } => {
            if !is_admin(uid) {
                return error("Only an administrator may change servers");
            }
            if runtime.remotes.remove(&addr) {
                persist_servers(runtime).await
            } else {
                error(format!("No server {addr} is configured"))
            }
        }
        LocalRequest::RulesApply { source_name, bytes } => {
            if !is_admin(uid) {
                return error("Only an administrator may set access rules");
            }
            match runtime.apply_rules(&source_name, &bytes).await {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(message) => error(message),
            }
        }
        LocalRequest::RulesShow => LocalReply::Json(runtime.rules_json().to_string()),
        LocalRequest::TriadJoin { members } => {
            if !is_admin(uid) {
                return error("Only an administrator may join a triad");
            }
            let settings = crate::triad_server::TriadSettings { members };
            match runtime.join_triad(settings, true).await {
                Ok(status) => LocalReply::Json(status.to_string()),
                Err(e) => error(format!("{:#}", anyhow::Error::from(e))),
            }
        }
        LocalRequest::TriadStatus { history } => match runtime.triad_status(history) {
            Some(status) => LocalReply::Json(status.to_string()),
            None => error("This runtime is not a triad member"),
        },
        LocalRequest::UsageVerify => {
            if !is_admin(uid) {
                return error("Only an administrator may read the usage log");
            }
            match runtime.usage_verify_json() {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::UsageSeats => {
            if !is_admin(uid) {
                return error("Only an administrator may read the usage log");
            }
            match runtime.usage_seats_json() {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::UsageReport { from_ms, to_ms } => {
            if !is_admin(uid) {
                return error("Only an administrator may read the usage log");
            }
            match runtime.usage_report_json(from_ms, to_ms) {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::TamperUsage { seq } => {
            if !is_admin(uid) {
                return error("Only an administrator may edit the usage log");
            }
            match runtime.tamper_usage(seq).await {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::ClaimWitness { licence } => {
            if !is_admin(uid) {
                return error("Only an administrator may claim witnesses");
            }
            match runtime.claim_witness(&licence).await {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::InflateSeats { quantity } => {
            if !is_admin(uid) {
                return error("Only an administrator may change how seats are asked for");
            }
            match runtime.inflate_seats(quantity) {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::ReleaseMemberSeats => {
            if !is_admin(uid) {
                return error("Only an administrator may give back seats");
            }
            match runtime.release_member_seats().await {
                Ok(answer) => LocalReply::Json(answer.to_string()),
                Err(e) => error(e.to_string()),
            }
        }
        LocalRequest::Trust { source_name, bytes } => {
            if !is_admin(uid) {
                return error("Only an administrator may trust vendors");
            }
            let result = runtime
                .licences
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trust(&source_name, &bytes);
            match result {
                Ok((firm, vendor)) => {
                    tracing::info!(firm, vendor, "vendor trusted");
                    LocalReply::Json(
                        serde_json::json!({"trusted": true, "firm": firm, "vendor": vendor})
                            .to_string(),
                    )
                }
                Err(e) => LocalReply::Error {
                    reason: e.reason(),
                    message: format!("{e:#}"),
                },
            }
        }
        LocalRequest::ActivationRequest {
            firm,
            products,
            vendor,
            triad_member,
        } => {
            if !is_admin(uid) {
                return error("Only an administrator may request activations");
            }
            match runtime
                .activation_request(firm, products, vendor, triad_member)
                .await
            {
                Ok(text) => LocalReply::Json(text),
                Err((message, reason)) => LocalReply::Error { message, reason },
            }
        }
        LocalRequest::InstallLicence { source_name, bytes } => {
            if !is_admin(uid) {
                return error("Only an administrator may install licences");
            }
            match runtime.install_licence(&source_name, &bytes).await {
                Ok(json) => LocalReply::Json(json.to_string()),
                Err((message, reason)) => LocalReply::Error { message, reason },
            }
        }
    }
}

async fn persist_servers(runtime: &Arc<Runtime>) -> LocalReply {
    let config = serde_json::to_vec(&runtime.remotes.config()).unwrap_or_default();
    match runtime
        .store
        .commit(vec![crate::store::Change::PutMeta(
            "servers".into(),
            config,
        )])
        .await
    {
        Ok(()) => LocalReply::Ok,
        Err(e) => LocalReply::Error {
            message: format!("Server list not saved: {e}"),
            reason: None,
        },
    }
}
