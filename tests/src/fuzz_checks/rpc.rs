//! The JSON-RPC frame decoder of the call-control WebSocket, and the typed parameters of
//! each method.

use serde_json::{json, Value};

use confroute_controller::control::{
    self, valid_digits, valid_target, ConferenceRef, DialoutParams, DtmfParams, ListParams,
    MoveParams, ParticipantRef, PlayParams, UpdateParams,
};
use confroute_controller::rpc::{codes, decode, Decoded, Item, Limits, Request};
use confroute_shared::name::ConferenceName;

/// Decodes the input as a text frame under the default limits and under tight ones.
pub fn jsonrpc_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let tight = Limits {
        max_message_size: 256,
        max_batch: 3,
        ..Limits::default()
    };
    for limits in [Limits::default(), tight] {
        frame(&text, &limits);
    }
}

fn frame(text: &str, limits: &Limits) {
    match decode(text, limits) {
        Decoded::Refused(e) => {
            let expected = if text.len() > limits.max_message_size {
                codes::MESSAGE_TOO_LARGE
            } else {
                // Refused whole: not JSON, an empty batch, or one far over the batch limit.
                let members = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text)
                    .map(|m| m.len())
                    .ok();
                match (serde_json::from_str::<Value>(text), members) {
                    (_, Some(n)) if n == 0 || n > limits.max_batch * 4 => codes::INVALID_REQUEST,
                    (Err(_), _) => codes::PARSE_ERROR,
                    (Ok(v), _) => panic!("refused a decodable frame {v}: {e:?}"),
                }
            };
            assert_eq!(e.code, expected, "{e:?}");
            assert!(!e.message.is_empty());
        }
        Decoded::Single(item) => {
            assert!(text.len() <= limits.max_message_size);
            one(item);
        }
        Decoded::Batch(items) => {
            let members = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text)
                .map(|m| m.len())
                .unwrap_or_default();
            assert!(items.len() <= members, "{} of {members}", items.len());
            assert!(
                members <= limits.max_batch,
                "{members} carried out past the limit"
            );
            assert!(!items.is_empty() && items.len() == members);
            items.into_iter().for_each(one);
        }
        Decoded::RefusedBatch {
            answers,
            notifications,
        } => {
            // Refused whole: every call answered with an error, notifications counted.
            let members = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text)
                .map(|m| m.len())
                .unwrap_or_default();
            assert!(
                members > limits.max_batch,
                "{members} refused within the limit"
            );
            assert_eq!(answers.len() + notifications, members);
            assert!(
                answers.iter().all(|i| i.is_err()),
                "carried out past the limit"
            );
            answers.into_iter().for_each(one);
        }
    }
}

fn is_id(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Null)
}

/// An accepted request has the documented shape and survives a round trip through its
/// canonical JSON; a rejected one is answered with a usable id and a request-level code.
fn one(item: Item) {
    let req = match item {
        Ok(r) => r,
        Err((id, e)) => {
            assert!(is_id(&id.value()), "error answer with id {}", id.raw());
            assert!(
                e.code == codes::INVALID_REQUEST || e.code == codes::INVALID_PARAMS,
                "{e:?}"
            );
            return;
        }
    };
    // By-name or by-position (JSON-RPC 2.0 §4.2); methods refuse positional ones.
    assert!(
        req.params.is_object() || req.params.is_array(),
        "params {}",
        req.params
    );
    assert!(req.id.as_ref().is_none_or(|id| is_id(&id.value())));
    // The id goes back as written: the answer echoes it verbatim.
    let canonical = format!(
        r#"{{"jsonrpc":"2.0","method":{},"params":{}{}}}"#,
        json!(req.method),
        req.params,
        req.id
            .as_ref()
            .map(|id| format!(r#","id":{}"#, id.raw()))
            .unwrap_or_default()
    );
    let unlimited = Limits {
        max_message_size: usize::MAX,
        ..Limits::default()
    };
    match decode(&canonical, &unlimited) {
        Decoded::Single(Ok(again)) => assert_eq!(again, req, "re-validation changed it"),
        other => panic!("{canonical} no longer validates: {other:?}"),
    }
    method_params(&req);
}

/// The typed parameters each method takes, and the checks applied to their values.
fn method_params(req: &Request) {
    let p = || req.params.clone();
    if req.params.is_array() {
        assert!(
            control::params::<ListParams>(p()).is_err(),
            "positional params are refused, never mapped onto fields by position"
        );
        return;
    }
    match req.method.as_str() {
        "conference.list" => {
            let _ = control::params::<ListParams>(p());
        }
        "conference.get" | "conference.end" | "participant.list" | "subscribe" | "unsubscribe" => {
            if let Ok(r) = control::params::<ConferenceRef>(p()) {
                let _ = ConferenceName::parse(&r.conference);
            }
        }
        "participant.mute" | "participant.unmute" | "participant.hold" | "participant.unhold"
        | "participant.kick" => {
            let _ = control::params::<ParticipantRef>(p());
        }
        "participant.dtmf" => {
            if let Ok(d) = control::params::<DtmfParams>(p()) {
                if valid_digits(&d.digits) {
                    assert!((1..=64).contains(&d.digits.len()));
                    assert!(d.digits.bytes().all(|b| b"0123456789*#ABCD".contains(&b)));
                }
            }
        }
        "conference.play" | "participant.play" => {
            let _ = control::params::<PlayParams>(p());
        }
        "participant.move" => {
            let _ = control::params::<MoveParams>(p());
        }
        "participant.update" => {
            let _ = control::params::<UpdateParams>(p());
        }
        "dialout" => {
            if let Ok(d) = control::params::<DialoutParams>(p()) {
                if valid_target(&d.to) {
                    // The target goes into a dial string: no room for injection.
                    assert!(d.to.len() <= 256);
                    assert!(!d.to.bytes().any(|b| b.is_ascii_control() || b == b' '));
                    let sip = d.to.starts_with("sip:") || d.to.starts_with("sips:");
                    let number = d.to.trim_start_matches('+');
                    assert!(
                        sip || number.bytes().all(|b| b.is_ascii_digit()),
                        "target {:?}",
                        d.to
                    );
                    if sip {
                        assert!(!d.to.contains(['<', '>', '"', '\'', ',']));
                    }
                }
            }
        }
        _ => {}
    }
}
