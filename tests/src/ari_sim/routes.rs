//! The ARI operations the simulator serves, and Asterisk's path-tree routing over them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use super::engine::Core;
use super::http::{ApiResult, Req};
use super::ops;
use super::spec::Spec;

pub(crate) type Handler = fn(&Arc<Core>, &mut Req) -> ApiResult;

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Rest(Handler),
    Events,
}

/// One served operation.
pub(crate) struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub nickname: &'static str,
    pub params: &'static [&'static str],
    pub kind: Kind,
}

/// Public description of a served operation, for conformance checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// HTTP method.
    pub method: &'static str,
    /// Path template relative to `/ari`.
    pub path: &'static str,
    /// Swagger nickname of the operation.
    pub nickname: &'static str,
    /// Query and body parameter names the handler may read.
    pub params: &'static [&'static str],
}

macro_rules! r {
    ($m:literal, $p:literal, $n:literal, [$($param:literal),*], $h:expr) => {
        Route { method: $m, path: $p, nickname: $n, params: &[$($param),*], kind: Kind::Rest($h) }
    };
}

const ORIGINATE_PARAMS: &[&str] = &[
    "endpoint",
    "extension",
    "context",
    "priority",
    "label",
    "app",
    "appArgs",
    "callerId",
    "timeout",
    "variables",
    "channelId",
    "otherChannelId",
    "originator",
    "formats",
];

const ORIGINATE_WITH_ID_PARAMS: &[&str] = &[
    "endpoint",
    "extension",
    "context",
    "priority",
    "label",
    "app",
    "appArgs",
    "callerId",
    "timeout",
    "variables",
    "otherChannelId",
    "originator",
    "formats",
];

fn table() -> Vec<Route> {
    let mut t = vec![
        r!("GET", "/asterisk/info", "getInfo", ["only"], ops::get_info),
        r!("GET", "/asterisk/ping", "ping", [], ops::ping),
        r!(
            "GET",
            "/asterisk/variable",
            "getGlobalVar",
            ["variable"],
            ops::get_global_var
        ),
        r!(
            "POST",
            "/asterisk/variable",
            "setGlobalVar",
            ["variable", "value"],
            ops::set_global_var
        ),
        r!("GET", "/applications", "list", [], ops::apps_list),
        r!(
            "GET",
            "/applications/{applicationName}",
            "get",
            [],
            ops::app_get
        ),
        r!(
            "POST",
            "/applications/{applicationName}/subscription",
            "subscribe",
            ["eventSource"],
            ops::app_subscribe
        ),
        r!(
            "DELETE",
            "/applications/{applicationName}/subscription",
            "unsubscribe",
            ["eventSource"],
            ops::app_unsubscribe
        ),
        r!("GET", "/bridges", "list", [], ops::bridges_list),
        r!(
            "POST",
            "/bridges",
            "create",
            ["type", "bridgeId", "name", "variables"],
            ops::bridge_create
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}",
            "createWithId",
            ["type", "name", "variables"],
            ops::bridge_create_with_id
        ),
        r!("GET", "/bridges/{bridgeId}", "get", [], ops::bridge_get),
        r!(
            "DELETE",
            "/bridges/{bridgeId}",
            "destroy",
            [],
            ops::bridge_destroy
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}/addChannel",
            "addChannel",
            [
                "channel",
                "role",
                "absorbDTMF",
                "mute",
                "inhibitConnectedLineUpdates"
            ],
            ops::bridge_add_channel
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}/removeChannel",
            "removeChannel",
            ["channel"],
            ops::bridge_remove_channel
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}/moh",
            "startMoh",
            ["mohClass"],
            ops::bridge_start_moh
        ),
        r!(
            "DELETE",
            "/bridges/{bridgeId}/moh",
            "stopMoh",
            [],
            ops::bridge_stop_moh
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}/play",
            "play",
            [
                "media",
                "announcer_format",
                "lang",
                "offsetms",
                "skipms",
                "playbackId"
            ],
            ops::bridge_play
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}/play/{playbackId}",
            "playWithId",
            ["media", "announcer_format", "lang", "offsetms", "skipms"],
            ops::bridge_play
        ),
        r!(
            "POST",
            "/bridges/{bridgeId}/record",
            "record",
            [
                "name",
                "format",
                "recorder_format",
                "maxDurationSeconds",
                "maxSilenceSeconds",
                "ifExists",
                "beep",
                "terminateOn"
            ],
            ops::bridge_record
        ),
        r!("GET", "/channels", "list", [], ops::channels_list),
        Route {
            method: "POST",
            path: "/channels",
            nickname: "originate",
            params: ORIGINATE_PARAMS,
            kind: Kind::Rest(ops::originate),
        },
        r!(
            "POST",
            "/channels/create",
            "create",
            [
                "endpoint",
                "app",
                "appArgs",
                "channelId",
                "otherChannelId",
                "originator",
                "formats",
                "variables"
            ],
            ops::channel_create
        ),
        r!("GET", "/channels/{channelId}", "get", [], ops::channel_get),
        Route {
            method: "POST",
            path: "/channels/{channelId}",
            nickname: "originateWithId",
            params: ORIGINATE_WITH_ID_PARAMS,
            kind: Kind::Rest(ops::originate),
        },
        r!(
            "DELETE",
            "/channels/{channelId}",
            "hangup",
            ["reason_code", "reason"],
            ops::hangup
        ),
        r!(
            "POST",
            "/channels/{channelId}/continue",
            "continueInDialplan",
            ["context", "extension", "priority", "label"],
            ops::continue_in_dialplan
        ),
        r!(
            "POST",
            "/channels/{channelId}/move",
            "move",
            ["app", "appArgs"],
            ops::move_app
        ),
        r!(
            "POST",
            "/channels/{channelId}/redirect",
            "redirect",
            ["endpoint"],
            ops::redirect
        ),
        r!(
            "POST",
            "/channels/{channelId}/answer",
            "answer",
            [],
            ops::answer
        ),
        r!("POST", "/channels/{channelId}/ring", "ring", [], ops::ring),
        r!(
            "DELETE",
            "/channels/{channelId}/ring",
            "ringStop",
            [],
            ops::ring_stop
        ),
        r!(
            "POST",
            "/channels/{channelId}/progress",
            "progress",
            [],
            ops::progress
        ),
        r!(
            "POST",
            "/channels/{channelId}/dtmf",
            "sendDTMF",
            ["dtmf", "before", "between", "duration", "after"],
            ops::send_dtmf
        ),
        r!(
            "POST",
            "/channels/{channelId}/mute",
            "mute",
            ["direction"],
            ops::mute
        ),
        r!(
            "DELETE",
            "/channels/{channelId}/mute",
            "unmute",
            ["direction"],
            ops::unmute
        ),
        r!("POST", "/channels/{channelId}/hold", "hold", [], ops::hold),
        r!(
            "DELETE",
            "/channels/{channelId}/hold",
            "unhold",
            [],
            ops::unhold
        ),
        r!(
            "POST",
            "/channels/{channelId}/moh",
            "startMoh",
            ["mohClass"],
            ops::channel_start_moh
        ),
        r!(
            "DELETE",
            "/channels/{channelId}/moh",
            "stopMoh",
            [],
            ops::channel_stop_moh
        ),
        r!(
            "POST",
            "/channels/{channelId}/silence",
            "startSilence",
            [],
            ops::start_silence
        ),
        r!(
            "DELETE",
            "/channels/{channelId}/silence",
            "stopSilence",
            [],
            ops::stop_silence
        ),
        r!(
            "POST",
            "/channels/{channelId}/play",
            "play",
            ["media", "lang", "offsetms", "skipms", "playbackId"],
            ops::channel_play
        ),
        r!(
            "POST",
            "/channels/{channelId}/play/{playbackId}",
            "playWithId",
            ["media", "lang", "offsetms", "skipms"],
            ops::channel_play
        ),
        r!(
            "POST",
            "/channels/{channelId}/record",
            "record",
            [
                "name",
                "format",
                "maxDurationSeconds",
                "maxSilenceSeconds",
                "ifExists",
                "beep",
                "terminateOn"
            ],
            ops::channel_record
        ),
        r!(
            "GET",
            "/channels/{channelId}/variable",
            "getChannelVar",
            ["variable"],
            ops::get_channel_var
        ),
        r!(
            "POST",
            "/channels/{channelId}/variable",
            "setChannelVar",
            ["variable", "value", "report_events"],
            ops::set_channel_var
        ),
        r!(
            "POST",
            "/channels/{channelId}/dial",
            "dial",
            ["caller", "timeout"],
            ops::dial
        ),
        r!(
            "GET",
            "/playbacks/{playbackId}",
            "get",
            [],
            ops::playback_get
        ),
        r!(
            "DELETE",
            "/playbacks/{playbackId}",
            "stop",
            [],
            ops::playback_stop
        ),
        r!(
            "GET",
            "/recordings/live/{recordingName}",
            "getLive",
            [],
            ops::recording_get
        ),
        r!(
            "DELETE",
            "/recordings/live/{recordingName}",
            "cancel",
            [],
            ops::recording_cancel
        ),
        r!(
            "POST",
            "/recordings/live/{recordingName}/stop",
            "stop",
            [],
            ops::recording_stop
        ),
    ];
    t.push(Route {
        method: "GET",
        path: "/events",
        nickname: "eventWebsocket",
        params: &["app", "subscribeAll"],
        kind: Kind::Events,
    });
    t
}

#[derive(Default)]
struct Node {
    literal: HashMap<String, Node>,
    wildcard: Option<(&'static str, Box<Node>)>,
    routes: Vec<usize>,
}

struct Tree {
    routes: Vec<Route>,
    root: Node,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let routes = table();
        let mut root = Node::default();
        for (i, r) in routes.iter().enumerate() {
            let mut node = &mut root;
            for seg in r.path.trim_start_matches('/').split('/') {
                node = match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => {
                        let (_, child) =
                            node.wildcard.get_or_insert_with(|| (name, Box::default()));
                        child
                    }
                    None => node.literal.entry(seg.to_string()).or_default(),
                };
            }
            node.routes.push(i);
        }
        Tree { routes, root }
    })
}

/// Every operation the simulator serves.
pub fn route_table() -> Vec<RouteInfo> {
    tree()
        .routes
        .iter()
        .map(|r| RouteInfo {
            method: r.method,
            path: r.path,
            nickname: r.nickname,
            params: r.params,
        })
        .collect()
}

/// Operations of the spec in `docs_dir` that the simulator does not serve: (method, path, nickname).
///
/// Read once per folder and process; many servers start from the same docs.
pub(crate) fn unsimulated_operations(docs_dir: &Path) -> Vec<(String, String, String)> {
    type Cache = std::sync::Mutex<HashMap<std::path::PathBuf, Vec<(String, String, String)>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(docs_dir)
    {
        return hit.clone();
    }
    let ops: Vec<(String, String, String)> = match Spec::load(docs_dir) {
        Ok(spec) => {
            let served = &tree().routes;
            spec.operations
                .iter()
                .filter(|op| {
                    !served
                        .iter()
                        .any(|r| r.method == op.method && r.path == op.path)
                })
                .map(|op| (op.method.clone(), op.path.clone(), op.nickname.clone()))
                .collect()
        }
        Err(_) => Vec::new(),
    };
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(docs_dir.to_path_buf(), ops.clone());
    ops
}

pub(crate) enum Dispatch {
    Route(&'static Route, HashMap<&'static str, String>),
    Options(String),
    MethodNotAllowed(String),
    Unsimulated(&'static str),
    NotFound,
}

fn unsimulated(core: &Core, method: &str, segments: &[String]) -> Option<&'static str> {
    let spec_like = core.unsimulated.iter().find(|(m, path, _)| {
        let t: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        m == method
            && t.len() == segments.len()
            && t.iter()
                .zip(segments)
                .all(|(t, s)| t.starts_with('{') || t == s)
    })?;
    // Nicknames of unsimulated operations only appear in the request log; leak once per name.
    static NAMES: OnceLock<std::sync::Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
    let name = names
        .entry(spec_like.2.clone())
        .or_insert_with(|| Box::leak(spec_like.2.clone().into_boxed_str()));
    Some(*name)
}

/// Walks the handler tree like `ast_ari_invoke`: literal segments first, then the wildcard.
pub(crate) fn dispatch(core: &Core, method: &str, segments: &[String]) -> Dispatch {
    let t = tree();
    let mut node = &t.root;
    let mut params = HashMap::new();
    // An Asterisk from before the route has no handler for it (`ast_ari_invoke`'s 404).
    if !core.cfg.progress_route
        && matches!(segments, [c, _, p] if c == "channels" && p == "progress")
    {
        return Dispatch::NotFound;
    }
    for seg in segments {
        if let Some(child) = node.literal.get(seg.as_str()) {
            node = child;
        } else if let Some((name, child)) = &node.wildcard {
            params.insert(*name, seg.clone());
            node = child;
        } else {
            return match unsimulated(core, method, segments) {
                Some(n) => Dispatch::Unsimulated(n),
                None => Dispatch::NotFound,
            };
        }
    }
    let allow = || {
        let mut s = String::from("OPTIONS");
        for i in &node.routes {
            s.push(',');
            s.push_str(t.routes[*i].method);
        }
        s
    };
    if method == "OPTIONS" {
        return Dispatch::Options(allow());
    }
    match node
        .routes
        .iter()
        .map(|i| &t.routes[*i])
        .find(|r| r.method == method)
    {
        Some(r) => Dispatch::Route(r, params),
        None => match unsimulated(core, method, segments) {
            Some(n) => Dispatch::Unsimulated(n),
            None => Dispatch::MethodNotAllowed(allow()),
        },
    }
}
