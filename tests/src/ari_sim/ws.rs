//! The events WebSocket: writes queued events, reads until the client goes away.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Core, WsCmd};

/// Serves one events WebSocket whose apps were registered under `sid` before the upgrade.
pub(crate) async fn run_session(
    core: Arc<Core>,
    sid: u64,
    mut rx: UnboundedReceiver<WsCmd>,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();
    let mut frozen = false;
    let writer = async {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                WsCmd::Text(text) => {
                    core.wait_stall().await;
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                // Dropped without a close frame: the client sees the connection vanish.
                WsCmd::Drop => break,
                WsCmd::Freeze => {
                    frozen = true;
                    break;
                }
            }
        }
    };
    let reader = async {
        // Asterisk consumes and ignores input until EOF.
        while let Some(msg) = stream.next().await {
            if matches!(msg, Err(_) | Ok(Message::Close(_))) {
                break;
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    if frozen {
        // Events for the session are lost on the dead link until it is dropped; the
        // socket is neither read nor written, so the client hears nothing, pongs included.
        while let Some(cmd) = rx.recv().await {
            if matches!(cmd, WsCmd::Drop) {
                break;
            }
        }
    }
    core.lock().close_session(sid);
}
