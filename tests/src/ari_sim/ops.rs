//! ARI operation handlers.
//!
//! Each follows the checks, order and messages of Asterisk's `res/ari/resource_*.c`; the
//! function named in each doc comment is the one mirrored.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::engine::{
    AfterAnswer, Bridge, ChanState, Core, Ev, HangupRequest, Leave, Playback, Recording, State,
    Target,
};
use super::http::{ApiErr, ApiResult, Req, Resp};
use super::scenario::reason_cause;
use super::time::{ari_timestamp, uuid4};

/// `AST_MAX_PUBLIC_UNIQUEID`.
const MAX_PUBLIC_UNIQUEID: usize = 128;
/// `AST_CHANNEL_NAME`: originate copies the endpoint's resource into a buffer this long, so
/// what is past its 79th byte is cut off without a word (`ast_copy_string` into
/// `dialdevice`).
const CHANNEL_NAME: usize = 80;

/// `s` cut as `ast_copy_string` into a buffer of `size` bytes cuts it: at most `size - 1`
/// bytes (a cut inside a UTF-8 sequence drops the sequence, where Asterisk keeps its bytes).
fn copy_string(s: &str, size: usize) -> &str {
    let mut end = s.len().min(size.saturating_sub(1));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Channel technologies the simulated Asterisk has drivers for (canonical spelling).
const TECHS: &[&str] = &[
    "PJSIP",
    "SIP",
    "IAX2",
    "DAHDI",
    "Local",
    "Motif",
    "UnicastRTP",
    "WebSocket",
    "AudioSocket",
];

/// File extensions a recording may be made in: those the format modules of a stock build
/// register (`ast_get_format_for_file_ext`, case-sensitive), `formats/format_*.c`. Codec names
/// that are no extension (`slin`, `g726`, `speex`) are unknown there. `opus` is left out: its
/// stock module reads only, so Asterisk accepts it and the recording fails at its first
/// write, which the simulator does not model.
const FILE_FORMATS: &[&str] = &[
    "sln", "raw", "sln12", "sln16", "sln24", "sln32", "sln44", "sln48", "sln96", "sln192", "pcm",
    "ulaw", "ul", "mu", "ulw", "alaw", "al", "alw", "au", "g722", "g719", "g723", "g723sf",
    "g726-40", "g726-32", "g726-24", "g726-16", "g729", "gsm", "ilbc", "h263", "h264", "vp8",
    "vox", "siren7", "siren14", "wav", "wav16", "WAV", "wav49", "ogg", "spx", "spx16", "spx32",
];

fn canonical_tech(tech: &str) -> Option<&'static str> {
    TECHS.iter().copied().find(|t| t.eq_ignore_ascii_case(tech))
}

fn ok(v: Value) -> ApiResult {
    Ok(Resp::Ok(v))
}

fn no_content() -> ApiResult {
    Ok(Resp::NoContent)
}

fn up(st: &State) -> Result<(), ApiErr> {
    if st.up {
        Ok(())
    } else {
        Err(ApiErr::new(503, "Asterisk not booted"))
    }
}

/// `find_control` in resource_channels.c: 404 unknown, 409 not in Stasis.
fn find_control(st: &State, id: &str) -> Result<(), ApiErr> {
    match st.channels.get(id) {
        None => Err(ApiErr::new(404, "Channel not found")),
        Some(ch) if ch.stasis.is_none() => {
            Err(ApiErr::new(409, "Channel not in Stasis application"))
        }
        Some(_) => Ok(()),
    }
}

/// `channel_state_invalid`: Down, Reserved and Ringing channels answer 412.
fn state_valid(st: &State, id: &str) -> Result<(), ApiErr> {
    match st.channels.get(id).map(|c| c.state) {
        None => Err(ApiErr::new(404, "Channel not found")),
        Some(ChanState::Down) | Some(ChanState::Ringing) => {
            Err(ApiErr::new(412, "Channel in invalid state"))
        }
        Some(_) => Ok(()),
    }
}

/// `find_control` followed by `channel_state_invalid`.
fn controllable(st: &State, id: &str) -> Result<(), ApiErr> {
    find_control(st, id)?;
    state_valid(st, id)
}

/// `find_bridge` in resource_bridges.c: every simulated bridge is a Stasis bridge until
/// `DELETE` unlinks it from the app's bridges; its snapshot stays while it dissolves.
fn find_bridge(st: &State, id: &str) -> Result<(), ApiErr> {
    match st.bridges.get(id) {
        Some(b) if !b.dissolving => Ok(()),
        Some(_) => Err(ApiErr::new(409, "Bridge not in Stasis application")),
        None => Err(ApiErr::new(404, "Bridge not found")),
    }
}

/// `find_channel_control` in resource_bridges.c: 400 unknown, 422 not in Stasis.
fn bridge_channel_control(st: &State, id: &str) -> Result<(), ApiErr> {
    match st.channels.get(id) {
        None => Err(ApiErr::new(400, "Channel not found")),
        Some(ch) if ch.stasis.is_none() => {
            Err(ApiErr::new(422, "Channel not in Stasis application"))
        }
        Some(_) => Ok(()),
    }
}

/// `control_list_create`: at least one channel, each one controllable.
fn control_list(st: &State, channels: &[String]) -> Result<Vec<String>, ApiErr> {
    let missing = || ApiErr::new(400, "Missing parameter channel");
    if channels.is_empty() {
        return Err(missing());
    }
    let mut out = Vec::new();
    for c in channels.iter().filter(|c| !c.is_empty()) {
        bridge_channel_control(st, c)?;
        out.push(c.clone());
    }
    if out.is_empty() {
        return Err(missing());
    }
    Ok(out)
}

/// `json_to_ast_variables`: the body's `variables` object, string values only.
fn body_variables(req: &mut Req) -> Result<Vec<(String, String)>, ApiErr> {
    let Some(vars) = req
        .params
        .body("variables")
        .and_then(|b| b.get("variables"))
        .cloned()
    else {
        return Ok(Vec::new());
    };
    // `ast_json_object_iter` of anything but an object finds nothing: no variables.
    let Some(obj) = vars.as_object() else {
        return Ok(Vec::new());
    };
    obj.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(ApiErr::new(
                400,
                "Only string values in the 'variables' object allowed",
            )),
        })
        .collect()
}

/// `ast_callerid_parse`: `"Name" <number>`, a bare number, or a bare name.
fn parse_callerid(s: &str) -> (String, String) {
    if let (Some(lt), Some(gt)) = (s.find('<'), s.rfind('>')) {
        if lt < gt {
            let name = s[..lt].trim().trim_matches('"').trim().to_string();
            return (name, s[lt + 1..gt].trim().to_string());
        }
    }
    let t = s.trim().trim_matches('"');
    if !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_digit() || "+*#-() .".contains(c))
    {
        let num: String = t.chars().filter(|c| !"-() .".contains(*c)).collect();
        (String::new(), num)
    } else {
        (t.to_string(), String::new())
    }
}

/// Splits `Stasis()` application data into arguments (`AST_STANDARD_APP_ARGS`).
fn split_args(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::to_string).collect()
    }
}

// ----- /asterisk -----

/// `ast_ari_asterisk_get_info`.
pub(crate) fn get_info(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let only = req.params.multi("only");
    let show =
        |section: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(section));
    let st = core.lock();
    up(&st)?;
    let mut info = serde_json::Map::new();
    if show("build") {
        info.insert(
            "build".into(),
            json!({
                "os": "Linux",
                "kernel": "6.1.0",
                "machine": "x86_64",
                "options": "",
                "date": "2024-01-01 00:00:00 UTC",
                "user": "root",
            }),
        );
    }
    if show("system") {
        info.insert(
            "system".into(),
            json!({"version": core.cfg.version, "entity_id": core.asterisk_id}),
        );
    }
    if show("config") {
        info.insert(
            "config".into(),
            json!({
                "name": core.cfg.system_name,
                "default_language": "en",
                "setid": {"user": "", "group": ""},
            }),
        );
    }
    if show("status") {
        info.insert(
            "status".into(),
            json!({
                "startup_time": ari_timestamp(st.startup),
                "last_reload_time": ari_timestamp(st.last_reload),
            }),
        );
    }
    ok(Value::Object(info))
}

/// `ast_ari_asterisk_ping`.
pub(crate) fn ping(core: &Arc<Core>, _req: &mut Req) -> ApiResult {
    ok(json!({
        "ping": "pong",
        "timestamp": ari_timestamp(SystemTime::now()),
        "asterisk_id": core.asterisk_id,
    }))
}

/// `ast_ari_asterisk_get_global_var`.
pub(crate) fn get_global_var(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let var = req.params.se("variable");
    if var.is_empty() {
        return Err(ApiErr::new(400, "Variable name is required"));
    }
    let st = core.lock();
    ok(json!({"value": st.globals.get(&var).cloned().unwrap_or_default()}))
}

/// `ast_ari_asterisk_set_global_var`.
pub(crate) fn set_global_var(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let var = req.params.se("variable");
    if var.is_empty() {
        return Err(ApiErr::new(400, "Variable name is required"));
    }
    let value = req.params.s("value");
    let mut st = core.lock();
    match value {
        Some(v) => st.globals.insert(var, v),
        None => st.globals.remove(&var),
    };
    no_content()
}

// ----- /applications -----

/// `ast_ari_applications_list`.
pub(crate) fn apps_list(core: &Arc<Core>, _req: &mut Req) -> ApiResult {
    let st = core.lock();
    let mut names: Vec<&String> = st.apps.keys().collect();
    names.sort();
    ok(Value::Array(
        names.into_iter().filter_map(|n| st.app_json(n)).collect(),
    ))
}

/// `ast_ari_applications_get`.
pub(crate) fn app_get(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let name = req.path("applicationName");
    let st = core.lock();
    st.app_json(&name)
        .map(Resp::Ok)
        .ok_or_else(|| ApiErr::new(404, "Application not found"))
}

enum Source {
    Channel(String),
    Bridge(String),
    Endpoint(String),
    Device(String),
}

fn parse_source(s: &str) -> Option<Source> {
    let (scheme, id) = s.split_once(':')?;
    Some(match scheme {
        "channel" => Source::Channel(id.to_string()),
        "bridge" => Source::Bridge(id.to_string()),
        "endpoint" => Source::Endpoint(id.to_string()),
        "deviceState" => Source::Device(id.to_string()),
        _ => return None,
    })
}

fn source_exists(st: &State, s: &Source) -> bool {
    match s {
        Source::Channel(id) => st.channels.contains_key(id),
        // `stasis_app_bridge_destroy` unlinks a bridge from the Stasis bridges before it
        // dissolves: `bridge_find` no longer sees one being destroyed.
        Source::Bridge(id) => st.bridges.get(id).is_some_and(|b| !b.dissolving),
        Source::Endpoint(id) => {
            let (tech, _) = id.split_once('/').unwrap_or((id.as_str(), ""));
            !tech.is_empty() && canonical_tech(tech).is_some()
        }
        Source::Device(id) => !id.is_empty(),
    }
}

fn source_map<'a>(
    app: &'a mut super::engine::App,
    s: &Source,
) -> (&'a mut std::collections::HashMap<String, u32>, String) {
    match s {
        Source::Channel(id) => (&mut app.channels, id.clone()),
        Source::Bridge(id) => (&mut app.bridges, id.clone()),
        Source::Endpoint(id) => (&mut app.endpoints, id.clone()),
        Source::Device(id) => (&mut app.devices, id.clone()),
    }
}

/// `ast_ari_applications_subscribe` / `stasis_app_subscribe`.
pub(crate) fn app_subscribe(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let sources = req.params.multi("eventSource");
    let name = req.path("applicationName");
    if sources.is_empty() {
        return Err(ApiErr::new(400, "Missing parameter eventSource"));
    }
    let mut st = core.lock();
    if !st.apps.contains_key(&name) {
        return Err(ApiErr::new(404, "Application not found"));
    }
    let mut parsed = Vec::new();
    for s in &sources {
        let src =
            parse_source(s).ok_or_else(|| ApiErr::new(400, "Invalid event source URI scheme"))?;
        if !source_exists(&st, &src) {
            return Err(ApiErr::new(422, "Event source does not exist"));
        }
        parsed.push(src);
    }
    if let Some(app) = st.apps.get_mut(&name) {
        for src in &parsed {
            let (map, id) = source_map(app, src);
            *map.entry(id).or_insert(0) += 1;
        }
    }
    st.app_json(&name)
        .map(Resp::Ok)
        .ok_or_else(ApiErr::alloc_failed)
}

/// `ast_ari_applications_unsubscribe` / `stasis_app_unsubscribe`.
pub(crate) fn app_unsubscribe(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let sources = req.params.multi("eventSource");
    let name = req.path("applicationName");
    if sources.is_empty() {
        return Err(ApiErr::new(400, "Missing parameter eventSource"));
    }
    let mut st = core.lock();
    let Some(app) = st.apps.get_mut(&name) else {
        return Err(ApiErr::new(404, "Application not found"));
    };
    let mut parsed = Vec::new();
    for s in &sources {
        let src =
            parse_source(s).ok_or_else(|| ApiErr::new(400, "Invalid event source URI scheme"))?;
        let (map, id) = source_map(app, &src);
        if !map.contains_key(&id) {
            return Err(ApiErr::new(422, "Event source was not subscribed to"));
        }
        parsed.push(src);
    }
    for src in &parsed {
        let (map, id) = source_map(app, src);
        if let Some(n) = map.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&id);
            }
        }
    }
    let json = st.app_json(&name).ok_or_else(ApiErr::alloc_failed)?;
    st.reap_app(&name);
    ok(json)
}

// ----- /bridges -----

/// `ast_ari_bridges_list`.
pub(crate) fn bridges_list(core: &Arc<Core>, _req: &mut Req) -> ApiResult {
    let st = core.lock();
    up(&st)?;
    let mut bridges: Vec<&Bridge> = st.bridges.values().collect();
    bridges.sort_by_key(|b| b.seq);
    ok(Value::Array(
        bridges.into_iter().map(|b| st.bridge_json(b)).collect(),
    ))
}

/// `stasis_app_bridge_create` in res/res_stasis.c: `None` when the type list is unusable.
fn parse_bridge_type(types: &str) -> Option<(bool, bool, bool, &'static str)> {
    let types = if types.is_empty() { "mixing" } else { types };
    let (mut mixing, mut holding, mut dtmf, mut proxy) = (false, false, false, false);
    let mut video = "talker";
    for t in types.split(',').map(str::trim) {
        match t {
            "mixing" => mixing = true,
            "holding" => holding = true,
            "dtmf_events" => dtmf = true,
            "proxy_media" => proxy = true,
            "video_sfu" => video = "sfu",
            "video_single" => video = "single",
            _ => {}
        }
    }
    // Holding and mixing capabilities don't mix; no capability at all is no bridge.
    if (!mixing && !holding) || (mixing && holding) {
        return None;
    }
    Some((holding, dtmf, proxy, video))
}

fn create_bridge(
    core: &Arc<Core>,
    st: &mut State,
    id: Option<String>,
    types: &str,
    name: &str,
) -> Option<Value> {
    let (holding, dtmf_events, proxy_media, video_mode) = parse_bridge_type(types)?;
    let id = id.filter(|i| !i.is_empty()).unwrap_or_else(uuid4);
    let seq = st.next_seq();
    st.bridges.insert(
        id.clone(),
        Bridge {
            id: id.clone(),
            name: name.to_string(),
            holding,
            dtmf_events,
            proxy_media,
            video_mode,
            types: if types.is_empty() {
                "mixing".into()
            } else {
                types.to_string()
            },
            created: SystemTime::now(),
            seq,
            channels: Vec::new(),
            moh: None,
            recording: None,
            dissolving: false,
            announcer: false,
        },
    );
    let json = st.brg_json(&id);
    let mut ev = Ev::new("BridgeCreated").with("bridge", json.clone());
    ev.bridges.push(id);
    st.emit(core, ev);
    Some(json)
}

/// `ast_ari_bridges_create`.
pub(crate) fn bridge_create(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let _ = req.params.body("variables");
    let types = req.params.se("type");
    let id = req.params.s("bridgeId");
    let name = req.params.se("name");
    let mut st = core.lock();
    up(&st)?;
    if let Some(existing) = id.as_ref().filter(|i| st.bridges.contains_key(*i)) {
        return Err(ApiErr::new(
            409,
            format!("Bridge with id '{existing}' already exists"),
        ));
    }
    match create_bridge(core, &mut st, id.clone(), &types, &name) {
        Some(json) => ok(json),
        None => Err(ApiErr::new(
            500,
            format!(
                "Unable to create bridge. Possible duplicate bridge id '{}'",
                id.as_deref().unwrap_or("(null)")
            ),
        )),
    }
}

/// `ast_ari_bridges_create_with_id`.
pub(crate) fn bridge_create_with_id(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let _ = req.params.body("variables");
    let id = req.path("bridgeId");
    let types = req.params.se("type");
    let name = req.params.se("name");
    let mut st = core.lock();
    up(&st)?;
    if let Some(existing) = st.bridges.get(&id) {
        if !core.cfg.bridge_update_on_create {
            return Err(ApiErr::new(
                409,
                format!("Bridge with id '{id}' already exists"),
            ));
        }
        // The update branch of older releases: it checks the name, then the type, and
        // answers with a snapshot it never took (no body).
        if !name.is_empty() && name != existing.name {
            return Err(ApiErr::new(500, "Changing bridge name is not implemented"));
        }
        if !types.is_empty() {
            return Err(ApiErr::new(
                500,
                "Supplying a bridge type when updating a bridge is not allowed.",
            ));
        }
        return ok(Value::Null);
    }
    create_bridge(core, &mut st, Some(id), &types, &name)
        .map(Resp::Ok)
        .ok_or_else(|| ApiErr::new(500, "Unable to create bridge"))
}

/// `ast_ari_bridges_get`.
pub(crate) fn bridge_get(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let st = core.lock();
    // By its snapshot: a bridge that is dissolving is still there.
    if !st.bridges.contains_key(&id) {
        return Err(ApiErr::new(404, "Bridge not found"));
    }
    ok(st.brg_json(&id))
}

/// `ast_ari_bridges_destroy`: `stasis_app_bridge_destroy` unlinks the bridge from the app's
/// bridges and asks it to dissolve; its members leave, and it goes, after the answer.
pub(crate) fn bridge_destroy(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let mut st = core.lock();
    find_bridge(&st, &id)?;
    if let Some(b) = st.bridges.get_mut(&id) {
        b.dissolving = true;
    }
    let epoch = st.epoch;
    super::engine::schedule(core, epoch, Duration::ZERO, move |core, st| {
        if st.bridges.get(&id).is_some_and(|b| b.dissolving) {
            st.bridge_destroy(core, &id);
        }
    });
    no_content()
}

/// `ast_ari_bridges_add_channel`: the bridge and every channel are checked on arrival; then
/// each channel in turn, once the one before it has been added, is refused 409 if it is
/// recording (the add rule, checked as the command is queued: earlier channels stay added)
/// or queued and waited for. A queued add that fails, the channel having left Stasis
/// first, still answers 204: only the recording check is reported.
pub(crate) fn bridge_add_channel(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let channels = req.params.multi("channel");
    let role = req.params.s("role").filter(|r| !r.is_empty());
    let absorb = req.params.boolean("absorbDTMF");
    let mute = req.params.boolean("mute");
    let _ = req.params.boolean("inhibitConnectedLineUpdates");
    let list = {
        let st = core.lock();
        find_bridge(&st, &id)?;
        control_list(&st, &channels)?
    };
    let core = core.clone();
    Ok(Resp::Later(Box::pin(async move {
        for c in list {
            let added = {
                let mut st = core.lock();
                if st.channels.get(&c).is_some_and(|ch| ch.recording.is_some()) {
                    return Err(ApiErr::new(409, format!("Channel {c} currently recording")));
                }
                let races = core
                    .hangup_during_add
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&c);
                if races {
                    st.hangup(&core, &c, 16, Some(HangupRequest::Remote));
                }
                let (id, c2, role) = (id.clone(), c.clone(), role.clone());
                State::call_channel_command(&core, &mut st, &c, move |core, st| {
                    st.bridge_add(core, &id, &c2, role, mute, absorb);
                })
            };
            // Failure (the channel left Stasis) is not reported.
            let _ = added.await;
        }
        no_content()
    })))
}

/// `ast_ari_bridges_remove_channel`: every channel must be in the bridge on arrival; the
/// removals are then queued and waited for one after another, their failures unreported.
pub(crate) fn bridge_remove_channel(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let channels = req.params.multi("channel");
    let list = {
        let st = core.lock();
        find_bridge(&st, &id)?;
        let list = control_list(&st, &channels)?;
        if list
            .iter()
            .any(|c| st.channels.get(c).and_then(|ch| ch.bridge.as_deref()) != Some(id.as_str()))
        {
            return Err(ApiErr::new(422, "Channel not in this bridge"));
        }
        list
    };
    let core = core.clone();
    Ok(Resp::Later(Box::pin(async move {
        for c in list {
            let removed = {
                let mut st = core.lock();
                let (id, c2) = (id.clone(), c.clone());
                State::call_channel_command(&core, &mut st, &c, move |core, st| {
                    // `app_control_remove_channel_from_bridge` departs only its own bridge.
                    if st.channels.get(&c2).and_then(|ch| ch.bridge.as_deref()) == Some(&id) {
                        st.bridge_remove(core, &id, &c2, Leave::Moved);
                    }
                })
            };
            let _ = removed.await;
        }
        no_content()
    })))
}

/// `ast_ari_bridges_start_moh`.
pub(crate) fn bridge_start_moh(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let class = req.params.s("mohClass").filter(|c| !c.is_empty());
    let mut st = core.lock();
    find_bridge(&st, &id)?;
    if let Some(b) = st.bridges.get_mut(&id) {
        b.moh = Some(class.unwrap_or_else(|| "default".into()));
    }
    no_content()
}

/// `ast_ari_bridges_stop_moh`.
pub(crate) fn bridge_stop_moh(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let mut st = core.lock();
    find_bridge(&st, &id)?;
    match st.bridges.get_mut(&id).and_then(|b| b.moh.take()) {
        Some(_) => no_content(),
        None => Err(ApiErr::new(409, "Bridge isn't playing music")),
    }
}

/// `ari_bridges_handle_play` (play and playWithId).
pub(crate) fn bridge_play(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let media = req.params.multi("media");
    let announcer_format = req.params.se("announcer_format");
    let lang = req.params.s("lang").filter(|l| !l.is_empty());
    let _ = req.params.int("offsetms");
    let _ = req.params.int("skipms");
    let playback_id = match req.path.get("playbackId") {
        Some(p) => Some(p.clone()),
        None => req.params.s("playbackId").filter(|p| !p.is_empty()),
    };
    let mut st = core.lock();
    find_bridge(&st, &id)?;
    // `ari_bridges_play_new`: only the first play makes the announcer channel, in
    // `announcer_format`; later plays reuse it and never look at the parameter.
    let first = !st.bridges.get(&id).is_some_and(|b| b.announcer);
    if first && !announcer_format.is_empty() && !CODECS.contains(&announcer_format.as_str()) {
        return Err(ApiErr::new(
            422,
            "specified announcer_format is unknown on this system",
        ));
    }
    let pid = playback_id.unwrap_or_else(uuid4);
    // `stasis_app_control_play_uri` refuses a list with any empty item.
    if media.is_empty() || media.iter().any(String::is_empty) || st.playbacks.contains_key(&pid) {
        return Err(ApiErr::alloc_failed());
    }
    let pb = Playback {
        id: pid.clone(),
        media,
        index: 0,
        target: Target::Bridge(id.clone()),
        language: lang.unwrap_or_else(|| "en".into()),
        state: "queued",
        seq: 0,
        canceled: false,
        controllable: false,
    };
    // `ari_bridges_play_new`: a new announcer indicates progress to every member
    // (`ast_bridge_queue_everyone_else`), so one not yet answered gets early media.
    let members = match st.bridges.get_mut(&id) {
        Some(b) if !b.announcer => {
            b.announcer = true;
            b.channels.clone()
        }
        _ => Vec::new(),
    };
    for m in members {
        if let Some(ch) = st.channels.get_mut(&m) {
            progress_unless_up(ch);
        }
    }
    let json = State::start_playback(core, &mut st, pb);
    Ok(Resp::Created(format!("/playbacks/{pid}"), json))
}

struct RecordArgs {
    name: String,
    format: String,
    max_duration: i64,
    max_silence: i64,
    if_exists: String,
    terminate_on: String,
}

fn record_args(req: &mut Req) -> RecordArgs {
    let a = RecordArgs {
        name: req.params.se("name"),
        format: req.params.se("format"),
        max_duration: req.params.int("maxDurationSeconds").unwrap_or(0),
        max_silence: req.params.int("maxSilenceSeconds").unwrap_or(0),
        if_exists: req.params.se("ifExists"),
        terminate_on: req.params.se("terminateOn"),
    };
    let _ = req.params.boolean("beep");
    a
}

/// Whether a recording name's directory part leaves the recordings directory: the one check
/// `stasis_app_control_record` makes of a name (`ast_safe_mkdir` on what comes before the
/// last `/`, EPERM, answered 400). `..` inside a file name, or a leading `/` (the name is
/// appended to the directory after a `/`), stays inside.
fn escapes_recording_dir(name: &str) -> bool {
    let Some((dir, _file)) = name.rsplit_once('/') else {
        return false;
    };
    let mut depth = 0usize;
    for part in dir.split('/') {
        match part {
            "" | "." => {}
            ".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

/// Option checks shared by channel and bridge recording, then `stasis_app_control_record`.
fn start_record(core: &Arc<Core>, st: &mut State, target: Target, a: RecordArgs) -> ApiResult {
    if !matches!(a.terminate_on.as_str(), "" | "none" | "any" | "*" | "#") {
        return Err(ApiErr::new(400, "terminateOn invalid"));
    }
    if !matches!(a.if_exists.as_str(), "" | "fail" | "overwrite" | "append") {
        return Err(ApiErr::new(400, "ifExists invalid"));
    }
    if !FILE_FORMATS.contains(&a.format.as_str()) {
        return Err(ApiErr::new(
            422,
            "specified format is unknown on this system",
        ));
    }
    if a.name.is_empty() || escapes_recording_dir(&a.name) {
        return Err(ApiErr::new(400, "Recording name invalid"));
    }
    if st.recordings.contains_key(&a.name) {
        return Err(ApiErr::new(
            409,
            format!(
                "Recording '{}' already exists and can not be overwritten",
                a.name
            ),
        ));
    }
    let token = st.next_seq();
    let rec = Recording {
        name: a.name.clone(),
        format: a.format,
        target,
        state: "queued",
        started: None,
        token,
        running: false,
    };
    let max = (a.max_duration > 0)
        .then(|| Duration::from_secs(u64::try_from(a.max_duration).unwrap_or(0)));
    let json = State::start_recording(core, st, rec, max);
    let encoded: String = form_urlencoded::byte_serialize(a.name.as_bytes()).collect();
    Ok(Resp::Created(format!("/recordings/live/{encoded}"), json))
}

/// Media format names Asterisk's format cache knows (`ast_format_cache_get`, the codecs
/// `main/codec_builtin.c` registers): `recorder_format`, and an originate's `formats`.
const CODECS: &[&str] = &[
    "codec2", "ulaw", "alaw", "gsm", "g722", "g723", "g726", "g726aal2", "g729", "ilbc", "lpc10",
    "adpcm", "speex", "speex16", "speex32", "opus", "siren7", "siren14", "g719", "testlaw", "slin",
    "slin12", "slin16", "slin24", "slin32", "slin44", "slin48", "slin96", "slin192", "silk8",
    "silk12", "silk16", "silk24", "jpeg", "png", "h261", "h263", "h263p", "h264", "mpeg4", "vp8",
    "red", "t140",
];

/// `ast_ari_bridges_record`: the file format, then the recorder channel's format, are
/// checked before the options shared with channel recording.
pub(crate) fn bridge_record(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("bridgeId");
    let recorder_format = req.params.se("recorder_format");
    let a = record_args(req);
    let mut st = core.lock();
    find_bridge(&st, &id)?;
    if !FILE_FORMATS.contains(&a.format.as_str()) {
        return Err(ApiErr::new(
            422,
            "specified format is unknown on this system",
        ));
    }
    if !recorder_format.is_empty() && !CODECS.contains(&recorder_format.as_str()) {
        return Err(ApiErr::new(
            422,
            "specified recorder_format is unknown on this system",
        ));
    }
    start_record(core, &mut st, Target::Bridge(id), a)
}

// ----- /channels -----

/// `ast_ari_channels_list`.
pub(crate) fn channels_list(core: &Arc<Core>, _req: &mut Req) -> ApiResult {
    let st = core.lock();
    up(&st)?;
    let mut chans: Vec<_> = st.channels.values().collect();
    chans.sort_by_key(|c| c.seq);
    ok(Value::Array(
        chans
            .into_iter()
            .map(|c| st.channel_json(core, c))
            .collect(),
    ))
}

/// `ast_ari_channels_get`.
pub(crate) fn channel_get(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let st = core.lock();
    if !st.channels.contains_key(&id) {
        return Err(ApiErr::new(404, "Channel not found"));
    }
    ok(st.chan_json(core, &id))
}

fn check_formats(formats: &str) -> Result<(), ApiErr> {
    for f in formats.split(',').map(str::trim) {
        if !CODECS.contains(&f) {
            return Err(ApiErr::new(
                400,
                format!("Provided format ({f}) was not found"),
            ));
        }
    }
    Ok(())
}

/// `ari_channels_handle_originate_with_id` (originate and originateWithId).
pub(crate) fn originate(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let variables = body_variables(req)?;
    let channel_id = match req.path.get("channelId") {
        Some(id) => Some(id.clone()),
        None => req.params.s("channelId").filter(|s| !s.is_empty()),
    };
    let other_id = req.params.s("otherChannelId").filter(|s| !s.is_empty());
    let endpoint = req.params.se("endpoint");
    let extension = req.params.se("extension");
    let context = req.params.se("context");
    let priority = req.params.int("priority").unwrap_or(0);
    let label = req.params.se("label");
    let app = req.params.se("app");
    let app_args = req.params.se("appArgs");
    let caller_id = req.params.se("callerId");
    let timeout = req.params.int("timeout").unwrap_or(0);
    let originator = req.params.se("originator");
    let formats = req.params.se("formats");

    if channel_id
        .as_ref()
        .is_some_and(|i| i.len() > MAX_PUBLIC_UNIQUEID)
        || other_id
            .as_ref()
            .is_some_and(|i| i.len() > MAX_PUBLIC_UNIQUEID)
    {
        return Err(ApiErr::new(
            400,
            format!("Uniqueid length exceeds maximum of {MAX_PUBLIC_UNIQUEID}"),
        ));
    }
    if endpoint.is_empty() {
        return Err(ApiErr::new(400, "Endpoint must be specified"));
    }
    if !originator.is_empty() && !formats.is_empty() {
        return Err(ApiErr::new(
            400,
            "Originator and formats can't both be specified",
        ));
    }
    let (tech, resource) = endpoint.split_once('/').unwrap_or((endpoint.as_str(), ""));
    let resource = copy_string(resource, CHANNEL_NAME);
    if tech.is_empty() || resource.is_empty() {
        return Err(ApiErr::new(400, "Invalid endpoint specified"));
    }
    let after = if !app.is_empty() {
        AfterAnswer::Stasis {
            app: app.clone(),
            args: split_args(&app_args),
        }
    } else if !extension.is_empty() {
        let priority = if label.is_empty() {
            if priority != 0 {
                priority
            } else {
                1
            }
        } else {
            // Without a dialplan only numeric labels resolve.
            let n = label
                .trim()
                .parse::<i64>()
                .map_err(|_| ApiErr::new(404, "Requested label can not be found"))?;
            if n == 0 {
                return Err(ApiErr::new(400, "Requested priority is illegal"));
            }
            n
        };
        AfterAnswer::Dialplan {
            context: if context.is_empty() {
                "default".into()
            } else {
                context
            },
            exten: extension,
            priority,
        }
    } else {
        return Err(ApiErr::new(
            400,
            "Application or extension must be specified",
        ));
    };
    let timeout = match timeout {
        t if t > 0 => Some(Duration::from_secs(u64::try_from(t).unwrap_or(30))),
        -1 => None,
        _ => Some(Duration::from_secs(30)),
    };
    let mut st = core.lock();
    up(&st)?;
    if !originator.is_empty() && !st.channels.contains_key(&originator) {
        return Err(ApiErr::new(
            400,
            "Provided originator channel was not found",
        ));
    }
    if !formats.is_empty() {
        check_formats(&formats)?;
    }
    if channel_id
        .iter()
        .chain(other_id.iter())
        .any(|i| st.channels.contains_key(i))
    {
        return Err(ApiErr::new(
            409,
            "Channel with given unique ID already exists",
        ));
    }
    let Some(tech) = canonical_tech(tech) else {
        return Err(ApiErr::alloc_failed());
    };
    let id = st.new_channel(core, channel_id, tech, resource, ChanState::Down, "en");
    if !caller_id.is_empty() {
        let (name, number) = parse_callerid(&caller_id);
        if let Some(ch) = st.channels.get_mut(&id) {
            ch.caller_name = name.clone();
            ch.caller_number = number.clone();
            ch.connected_name = name;
            ch.connected_number = number;
        }
    }
    st.set_app(core, &id, "AppDial2", "(Outgoing Line)");
    for (k, v) in &variables {
        st.set_var(core, &id, k, v);
    }
    if let Some(ch) = st.channels.get_mut(&id) {
        ch.originated = true;
    }
    if !app.is_empty() {
        st.sub_channel(&app, &id);
    }
    let json = st.chan_json(core, &id);
    let outcome = st.outcome_for(core, &format!("{tech}/{resource}"));
    State::start_dial(core, &mut st, &id, after, outcome, timeout, None);
    ok(json)
}

/// `ast_ari_channels_create`: a Down channel that enters Stasis at once, dialled later.
pub(crate) fn channel_create(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let variables = body_variables(req)?;
    let endpoint = req.params.se("endpoint");
    let app = req.params.se("app");
    let app_args = req.params.se("appArgs");
    let channel_id = req.params.s("channelId").filter(|s| !s.is_empty());
    let other_id = req.params.s("otherChannelId").filter(|s| !s.is_empty());
    let originator = req.params.se("originator");
    let formats = req.params.se("formats");
    if !originator.is_empty() && !formats.is_empty() {
        return Err(ApiErr::new(
            400,
            "Originator and formats can't both be specified",
        ));
    }
    if endpoint.is_empty() {
        return Err(ApiErr::new(400, "Endpoint must be specified"));
    }
    let (tech, resource) = endpoint.split_once('/').unwrap_or((endpoint.as_str(), ""));
    if tech.is_empty() || resource.is_empty() {
        return Err(ApiErr::new(400, "Invalid endpoint specified"));
    }
    let mut st = core.lock();
    up(&st)?;
    let originator_found = !originator.is_empty() && st.channels.contains_key(&originator);
    if !originator_found && !formats.is_empty() {
        check_formats(&formats)?;
    }
    if channel_id
        .iter()
        .chain(other_id.iter())
        .any(|i| st.channels.contains_key(i))
    {
        return Err(ApiErr::new(
            409,
            "Channel with given unique ID already exists",
        ));
    }
    let Some(tech) = canonical_tech(tech) else {
        return Err(ApiErr::alloc_failed());
    };
    let id = st.new_channel(core, channel_id, tech, resource, ChanState::Down, "en");
    if !app.is_empty() {
        st.sub_channel(&app, &id);
        if originator_found {
            st.sub_channel(&app, &originator);
        }
    }
    for (k, v) in &variables {
        st.set_var(core, &id, k, v);
    }
    if let Some(ch) = st.channels.get_mut(&id) {
        ch.dialstring = Some(resource.to_string());
        ch.originated = true;
    }
    let json = st.chan_json(core, &id);
    let epoch = st.epoch;
    let args = split_args(&app_args);
    let cid = id.clone();
    super::engine::schedule(core, epoch, Duration::ZERO, move |core, st| {
        let mut data = app.clone();
        for a in &args {
            data.push(',');
            data.push_str(a);
        }
        st.set_app(core, &cid, "Stasis", &data);
        if !st.enter_stasis(core, &cid, &app, args) {
            st.set_var(core, &cid, "STASISSTATUS", "FAILED");
            st.hangup(core, &cid, 16, None);
        }
    });
    ok(json)
}

/// `sscanf("%d")`: optional leading whitespace and sign, then the digits up to the first
/// other character; `None` without a digit.
fn scan_int(s: &str) -> Option<i64> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let digits: String = rest
        .chars()
        .take_while(char::is_ascii_digit)
        .take(30)
        .collect();
    if digits.is_empty() {
        return None;
    }
    let n = digits.bytes().fold(0i64, |n, d| {
        n.saturating_mul(10).saturating_add(i64::from(d - b'0'))
    });
    Some(if negative { -n } else { n })
}

/// `ast_ari_channels_hangup`.
pub(crate) fn hangup(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let reason = req.params.se("reason");
    let reason_code = req.params.se("reason_code");
    let st = core.lock();
    if !st.channels.contains_key(&id) {
        return Err(ApiErr::new(404, "Channel not found"));
    }
    let cause = if core.cfg.classic_hangup_reasons {
        match reason.as_str() {
            "" | "normal" => 16,
            "busy" => 17,
            "congestion" => 34,
            _ => return Err(ApiErr::new(400, "Invalid reason for hangup provided")),
        }
    } else {
        if !reason.is_empty() && !reason_code.is_empty() {
            return Err(ApiErr::new(
                400,
                "The reason and reason_code can't both be specified",
            ));
        }
        if !reason_code.is_empty() {
            scan_int(&reason_code)
                .ok_or_else(|| ApiErr::new(400, "Invalid reason for hangup reason code provided"))?
        } else if !reason.is_empty() {
            reason_cause(&reason)
                .ok_or_else(|| ApiErr::new(400, "Invalid reason for hangup reason provided"))?
        } else {
            16
        }
    };
    // Asterisk only queues a soft hangup here; a channel slow to act on it stays meanwhile.
    if let Some(pending) = core
        .slow_hangups
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        pending.get_or_insert(cause);
        return no_content();
    }
    // The channel's own thread acts on the soft hangup after this answer is on its way.
    let epoch = st.epoch;
    super::engine::schedule(core, epoch, Duration::ZERO, move |core, st| {
        if st.channels.contains_key(&id) {
            st.hangup(core, &id, cause, Some(HangupRequest::Soft));
        }
    });
    no_content()
}

/// `ast_ari_channels_continue_in_dialplan`.
pub(crate) fn continue_in_dialplan(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let context = req.params.se("context");
    let extension = req.params.se("extension");
    let priority = req.params.int("priority").unwrap_or(0);
    let label = req.params.se("label");
    let mut st = core.lock();
    controllable(&st, &id)?;
    let Some(ch) = st.channels.get(&id) else {
        return Err(ApiErr::new(404, "Channel not found"));
    };
    let (ctx, exten) = if context.is_empty() {
        (
            ch.context.clone(),
            if extension.is_empty() {
                ch.exten.clone()
            } else {
                extension.clone()
            },
        )
    } else {
        (
            context.clone(),
            if extension.is_empty() {
                "s".into()
            } else {
                extension.clone()
            },
        )
    };
    let pri = if !label.is_empty() {
        let n = label
            .trim()
            .parse::<i64>()
            .map_err(|_| ApiErr::new(404, "Requested label can not be found"))?;
        if n == 0 {
            return Err(ApiErr::new(400, "Requested priority is illegal"));
        }
        n
    } else if priority != 0 {
        priority
    } else if context.is_empty() && extension.is_empty() {
        ch.priority + 1
    } else {
        1
    };
    // `app_control_continue`: the goto, then `control_mark_done`; the channel leaves Stasis
    // once its queue is empty.
    let channel = id.clone();
    State::run_channel_command(core, &mut st, &id, move |_, st| {
        if let Some(ch) = st.channels.get_mut(&channel) {
            ch.context = ctx;
            ch.exten = exten;
            ch.priority = pri;
            ch.control_done = true;
        }
    });
    no_content()
}

/// `ast_ari_channels_move`: StasisEnd in the old app, StasisStart in the new one.
pub(crate) fn move_app(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let app = req.params.se("app");
    let args = split_args(&req.params.se("appArgs"));
    let mut st = core.lock();
    find_control(&st, &id)?;
    // `app_control_move` only notes the move; the Stasis loop makes it between dispatch
    // passes. The last move's app wins, and every move's arguments add up (the vector of
    // `next_app_args` is never cleared).
    let channel = id.clone();
    State::run_channel_command(core, &mut st, &id, move |_, st| {
        if let Some(ch) = st.channels.get_mut(&channel) {
            let mut all = ch.next_app.take().map(|(_, a)| a).unwrap_or_default();
            all.extend(args);
            ch.next_app = Some((app, all));
        }
    });
    no_content()
}

/// The Stasis loop's move: StasisEnd in the old app, StasisStart in the new one, or
/// ApplicationMoveFailed when the new one is not registered.
pub(crate) fn move_to_app(
    core: &Arc<Core>,
    st: &mut State,
    id: &str,
    app: String,
    args: Vec<String>,
) {
    let Some(old) = st.channels.get(id).and_then(|c| c.stasis.clone()) else {
        return;
    };
    let id = id.to_string();
    if !st.app_active(&app) {
        let mut ev = st
            .chan_ev(core, "ApplicationMoveFailed", &id)
            .with("destination", json!(app))
            .with("args", json!(args));
        ev.channels.clear();
        ev.endpoints.clear();
        ev.to_app = Some(old.app);
        st.emit(core, ev);
        return;
    }
    let bridge = st.channels.get(&id).and_then(|c| c.bridge.clone());
    if let Some(ch) = st.channels.get_mut(&id) {
        ch.stasis = None;
    }
    if let Some(b) = &bridge {
        st.unsub_bridge(&old.app, b);
    }
    st.unsub_channel(&old.app, &id);
    let mut ev = st.chan_ev(core, "StasisEnd", &id);
    ev.to_app = Some(old.app);
    st.emit(core, ev);
    if st.enter_stasis(core, &id, &app, args) {
        if let Some(b) = &bridge {
            st.sub_bridge(&app, b);
        }
    }
}

/// `ast_ari_channels_redirect`: the far end is told to go elsewhere and hangs up.
pub(crate) fn redirect(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let endpoint = req.params.se("endpoint");
    let mut st = core.lock();
    controllable(&st, &id)?;
    if endpoint.is_empty() {
        return Err(ApiErr::new(
            400,
            "Required parameter 'endpoint' not provided.",
        ));
    }
    let Some((tech, resource)) = endpoint.split_once('/').filter(|(t, _)| !t.is_empty()) else {
        return Err(ApiErr::new(
            422,
            format!("Endpoint parameter '{endpoint}' does not contain tech/resource"),
        ));
    };
    if resource.is_empty() {
        return Err(ApiErr::new(
            422,
            format!("No resource provided in endpoint parameter '{endpoint}'"),
        ));
    }
    let chan_tech = st
        .channels
        .get(&id)
        .map(|c| c.tech.clone())
        .unwrap_or_default();
    if !chan_tech.eq_ignore_ascii_case(tech) {
        return Err(ApiErr::new(
            422,
            format!("Endpoint technology '{tech}' does not match channel technology '{chan_tech}'"),
        ));
    }
    let channel = id.clone();
    State::run_channel_command(core, &mut st, &id, move |core, st| {
        // chan_pjsip's `transfer()`: an unanswered call is answered 302, its transfer done at
        // once (`transfer_redirect`); an answered one gets a REFER, and `ast_transfer` holds
        // the channel's command queue until the far end's NOTIFY says how it ended, or the
        // call ends (`transfer_refer`, `ast_transfer` in main/channel.c).
        // A channel driver without a transfer callback (DAHDI, Local, ...) does nothing:
        // `ast_transfer` returns 0 and `app_control_redirect` only logs it.
        let supported = st.channels.get(&channel).is_some_and(|c| {
            c.tech.eq_ignore_ascii_case("PJSIP") || c.tech.eq_ignore_ascii_case("SIP")
        });
        if !supported {
            return;
        }
        // State Ring gets the 302, which ends the call: no far end can refuse it. Any other
        // gets a REFER, which an early dialog cannot take (refused), and an answered call's
        // far end may refuse.
        let mut redirected = false;
        if let Some(ch) = st.channels.get_mut(&channel) {
            ch.redirected_to = Some(endpoint);
            redirected = ch.state == ChanState::Ring;
            ch.transferring = !redirected;
        }
        let early = st
            .channels
            .get(&channel)
            .is_some_and(|c| c.state != ChanState::Up && c.state != ChanState::Ring);
        // `app_control_redirect` ignores how the transfer ends: a far end that refuses it
        // leaves the channel as it was, and ARI says nothing.
        let refused = !redirected
            && (early
                || core
                    .refused_transfers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&channel));
        let epoch = st.epoch;
        super::engine::schedule(core, epoch, core.cfg.ring_time, move |core, st| {
            if refused {
                State::end_transfer(core, st, &channel);
            } else {
                st.hangup(core, &channel, 16, Some(HangupRequest::Remote));
            }
        });
    });
    no_content()
}

/// `ast_ari_channels_answer`: checked on arrival, then queued and waited for; a channel that
/// leaves Stasis or hangs up before its turn answers 500.
pub(crate) fn answer(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let mut st = core.lock();
    controllable(&st, &id)?;
    let races = core
        .hangup_during_answer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    if races {
        st.hangup(core, &id, 16, Some(HangupRequest::Remote));
    }
    let channel = id.clone();
    let answered = State::call_channel_command(core, &mut st, &id, move |core, st| {
        st.set_state(core, &channel, ChanState::Up);
    });
    Ok(Resp::Later(Box::pin(async move {
        match answered.await {
            Ok(()) => no_content(),
            Err(_) => Err(ApiErr::new(500, "Failed to answer channel")),
        }
    })))
}

/// An asynchronous command on a channel in Stasis: answered at once, `f` applied to the
/// channel when its turn in the channel's command queue comes.
fn with_channel<F: FnOnce(&mut super::engine::Channel) + Send + 'static>(
    core: &Arc<Core>,
    req: &mut Req,
    f: F,
) -> ApiResult {
    let id = req.path("channelId");
    let mut st = core.lock();
    controllable(&st, &id)?;
    on_channel(core, &mut st, &id, f);
    no_content()
}

/// Queues `f` on channel `id` as an asynchronous command ([`State::run_channel_command`]).
fn on_channel<F: FnOnce(&mut super::engine::Channel) + Send + 'static>(
    core: &Arc<Core>,
    st: &mut State,
    id: &str,
    f: F,
) {
    let channel = id.to_string();
    State::run_channel_command(core, st, id, move |_, st| {
        if let Some(ch) = st.channels.get_mut(&channel) {
            f(ch);
        }
    });
}

/// `ast_ari_channels_ring`.
pub(crate) fn ring(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    with_channel(core, req, |ch| ch.ringing = true)
}

/// `ast_ari_channels_ring_stop`.
pub(crate) fn ring_stop(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    with_channel(core, req, |ch| ch.ringing = false)
}

/// `ast_ari_channels_progress` (Asterisk 20.16, 21.11, 22.6): indicates progress (SIP 183,
/// early media); the channel stays unanswered.
pub(crate) fn progress(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    with_channel(core, req, |ch| ch.early_media = true)
}

/// `ast_ari_channels_send_dtmf`.
pub(crate) fn send_dtmf(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let dtmf = req.params.se("dtmf");
    for p in ["before", "between", "duration", "after"] {
        let _ = req.params.int(p);
    }
    let mut st = core.lock();
    controllable(&st, &id)?;
    if dtmf.is_empty() {
        return Err(ApiErr::new(400, "DTMF is required"));
    }
    on_channel(core, &mut st, &id, move |ch| {
        progress_unless_up(ch);
        ch.dtmf_sent.push_str(&dtmf)
    });
    no_content()
}

fn mute_direction(core: &Arc<Core>, req: &mut Req, on: bool) -> ApiResult {
    let id = req.path("channelId");
    let direction = req.params.se("direction");
    let mut st = core.lock();
    controllable(&st, &id)?;
    let (inbound, outbound) = match direction.as_str() {
        "" => return Err(ApiErr::new(400, "Direction is required")),
        "in" => (true, false),
        "out" => (false, true),
        "both" => (true, true),
        _ => return Err(ApiErr::new(400, "Invalid direction specified")),
    };
    on_channel(core, &mut st, &id, move |ch| {
        if inbound {
            ch.mute_in = on;
        }
        if outbound {
            ch.mute_out = on;
        }
    });
    no_content()
}

/// `ast_ari_channels_mute`.
pub(crate) fn mute(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    mute_direction(core, req, true)
}

/// `ast_ari_channels_unmute`.
pub(crate) fn unmute(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    mute_direction(core, req, false)
}

/// `app_control_hold` indicates hold to the far end (which then hears music on hold).
/// `ChannelHold`/`ChannelUnhold` are published only when the far end holds (`ast_queue_hold`)
/// or a bridge writes a hold, so this sends no event.
fn hold_state(core: &Arc<Core>, req: &mut Req, held: bool) -> ApiResult {
    let id = req.path("channelId");
    let mut st = core.lock();
    controllable(&st, &id)?;
    on_channel(core, &mut st, &id, move |ch| ch.held = held);
    no_content()
}

/// `ast_ari_channels_hold`.
pub(crate) fn hold(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    hold_state(core, req, true)
}

/// `ast_ari_channels_unhold`.
pub(crate) fn unhold(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    hold_state(core, req, false)
}

/// control.c `app_control_moh_start`, `app_control_silence_start`, `app_control_dtmf` (and
/// res_stasis_playback.c `play_on_channel`) indicate progress to a channel not yet answered
/// before they send it media: early media, the channel still unanswered.
pub(crate) fn progress_unless_up(ch: &mut super::engine::Channel) {
    if ch.state != ChanState::Up {
        ch.early_media = true;
    }
}

/// `ast_ari_channels_start_moh`.
pub(crate) fn channel_start_moh(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let class = req.params.s("mohClass").filter(|c| !c.is_empty());
    with_channel(core, req, |ch| {
        progress_unless_up(ch);
        ch.moh = Some(class.unwrap_or_else(|| "default".into()))
    })
}

/// `ast_ari_channels_stop_moh`.
pub(crate) fn channel_stop_moh(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    with_channel(core, req, |ch| ch.moh = None)
}

/// `ast_ari_channels_start_silence`.
pub(crate) fn start_silence(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    with_channel(core, req, |ch| {
        progress_unless_up(ch);
        ch.silence = true
    })
}

/// `ast_ari_channels_stop_silence`.
pub(crate) fn stop_silence(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    with_channel(core, req, |ch| ch.silence = false)
}

/// `ari_channels_handle_play` (play and playWithId).
pub(crate) fn channel_play(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let media = req.params.multi("media");
    let lang = req.params.s("lang").filter(|l| !l.is_empty());
    let offsetms = req.params.int("offsetms").unwrap_or(0);
    let skipms = req.params.int("skipms").unwrap_or(3000);
    let playback_id = match req.path.get("playbackId") {
        Some(p) => Some(p.clone()),
        None => req.params.s("playbackId").filter(|p| !p.is_empty()),
    };
    let mut st = core.lock();
    controllable(&st, &id)?;
    if skipms < 0 {
        return Err(ApiErr::new(400, "skipms cannot be negative"));
    }
    if offsetms < 0 {
        return Err(ApiErr::new(400, "offsetms cannot be negative"));
    }
    let pid = playback_id.unwrap_or_else(uuid4);
    // `stasis_app_control_play_uri` refuses a list with any empty item.
    if media.is_empty() || media.iter().any(String::is_empty) || st.playbacks.contains_key(&pid) {
        return Err(ApiErr::new(500, "Failed to queue media for playback"));
    }
    let language = lang.unwrap_or_else(|| {
        st.channels
            .get(&id)
            .map(|c| c.language.clone())
            .unwrap_or_default()
    });
    let pb = Playback {
        id: pid.clone(),
        media,
        index: 0,
        target: Target::Channel(id),
        language,
        state: "queued",
        seq: 0,
        canceled: false,
        controllable: false,
    };
    let json = State::start_playback(core, &mut st, pb);
    Ok(Resp::Created(format!("/playbacks/{pid}"), json))
}

/// `ast_ari_channels_record`.
pub(crate) fn channel_record(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let a = record_args(req);
    if a.max_duration < 0 {
        return Err(ApiErr::new(400, "max_duration_seconds cannot be negative"));
    }
    if a.max_silence < 0 {
        return Err(ApiErr::new(400, "max_silence_seconds cannot be negative"));
    }
    let mut st = core.lock();
    find_control(&st, &id)?;
    start_record(core, &mut st, Target::Channel(id), a)
}

/// `ast_ari_channels_get_channel_var`: any channel, in Stasis or not.
pub(crate) fn get_channel_var(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let var = req.params.se("variable");
    if var.is_empty() {
        return Err(ApiErr::new(400, "Variable name is required"));
    }
    let st = core.lock();
    let Some(ch) = st.channels.get(&id) else {
        return Err(ApiErr::new(404, "Provided channel was not found"));
    };
    match super::engine::read_variable(ch, &var, &st.globals) {
        Err(()) => Err(ApiErr::new(500, "Unable to read provided function")),
        Ok(None) => Err(ApiErr::new(404, "Provided variable was not found")),
        Ok(Some(v)) => ok(json!({ "value": v })),
    }
}

/// `ast_ari_channels_set_channel_var`.
pub(crate) fn set_channel_var(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let var = req.params.se("variable");
    let value = req.params.s("value");
    let _ = req.params.boolean("report_events");
    if var.is_empty() {
        return Err(ApiErr::new(400, "Variable name is required"));
    }
    let mut st = core.lock();
    find_control(&st, &id)?;
    // Queued (`stasis_app_control_set_channel_var`): answered 204 before it runs, so a
    // function that cannot be written fails later, in Asterisk's log only.
    let channel = id.clone();
    State::run_channel_command(core, &mut st, &id, move |core, st| {
        if let Some(inner) = var.strip_suffix(')') {
            let Some(ch) = st.channels.get_mut(&channel) else {
                return;
            };
            let v = value.unwrap_or_default();
            match inner.to_ascii_uppercase().as_str() {
                "CALLERID(NAME" => ch.caller_name = v,
                "CALLERID(NUM" | "CALLERID(NUMBER" => ch.caller_number = v,
                _ => {}
            }
            return;
        }
        match value {
            Some(v) => st.set_var(core, &channel, &var, &v),
            None => {
                if let Some(ch) = st.channels.get_mut(&channel) {
                    ch.vars.remove(&var);
                }
            }
        }
    });
    no_content()
}

/// `ast_ari_channels_dial`: dials a channel made with `/channels/create`.
pub(crate) fn dial(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("channelId");
    let caller = req.params.s("caller").filter(|c| !c.is_empty());
    let timeout = req.params.int("timeout").unwrap_or(0);
    let mut st = core.lock();
    find_control(&st, &id)?;
    let Some(ch) = st.channels.get(&id) else {
        return Err(ApiErr::new(404, "Callee not found"));
    };
    if ch.state != ChanState::Down {
        return Err(ApiErr::new(409, "Channel is not in the 'Down' state"));
    }
    if ch.dialstring.is_none() {
        return Err(ApiErr::new(409, "Dialing a channel not created by ARI"));
    }
    let endpoint = format!("{}/{}", ch.tech, ch.resource);
    let caller = caller.filter(|c| st.channels.contains_key(c));
    let timeout = (timeout > 0).then(|| Duration::from_secs(u64::try_from(timeout).unwrap_or(0)));
    let outcome = st.outcome_for(core, &endpoint);
    State::start_dial(
        core,
        &mut st,
        &id,
        AfterAnswer::StayInStasis,
        outcome,
        timeout,
        caller,
    );
    no_content()
}

// ----- /playbacks and /recordings -----

/// `ast_ari_playbacks_get`.
pub(crate) fn playback_get(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("playbackId");
    let st = core.lock();
    st.playbacks
        .get(&id)
        .map(|p| Resp::Ok(State::playback_json(p)))
        .ok_or_else(|| ApiErr::new(404, "Playback not found"))
}

/// `ast_ari_playbacks_stop`.
pub(crate) fn playback_stop(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let id = req.path("playbackId");
    let mut st = core.lock();
    let Some(pb) = st.playbacks.get_mut(&id) else {
        return Err(ApiErr::new(404, "Playback not found"));
    };
    // `playback_cancel`: one still waiting for its turn is only marked; it ends, unplayed,
    // when its turn comes.
    if matches!(pb.state, "queued" | "starting") {
        pb.canceled = true;
        return no_content();
    }
    // `playback_stop`: only a sound, a recording or a tone can be stopped; `number:`,
    // `digits:` and `characters:` are said to the end.
    if !pb.controllable {
        return Err(ApiErr::new(500, "Could not stop playback"));
    }
    State::end_playback(core, &mut st, &id);
    no_content()
}

/// `ast_ari_recordings_get_live`.
pub(crate) fn recording_get(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    let name = req.path("recordingName");
    let st = core.lock();
    st.recordings
        .get(&name)
        .map(|r| Resp::Ok(State::recording_json(r)))
        .ok_or_else(|| ApiErr::new(404, "Recording not found"))
}

/// `control_recording` with `stasis_app_recording_operation`: a recording still queued is
/// only marked canceled (`recording_disregard`: no event; it still starts, and records, when
/// its turn comes); one that was is no longer "in session"; one under way ends.
fn recording_operation(core: &Arc<Core>, req: &mut Req, end_state: &'static str) -> ApiResult {
    let name = req.path("recordingName");
    let mut st = core.lock();
    let Some(rec) = st.recordings.get_mut(&name) else {
        return Err(ApiErr::new(404, "Recording not found"));
    };
    match rec.state {
        "queued" => {
            rec.state = "canceled";
            no_content()
        }
        "recording" => {
            State::end_recording(core, &mut st, &name, end_state);
            no_content()
        }
        _ => Err(ApiErr::new(409, "Recording not in session")),
    }
}

/// `ast_ari_recordings_stop`.
pub(crate) fn recording_stop(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    recording_operation(core, req, "done")
}

/// `ast_ari_recordings_cancel`.
pub(crate) fn recording_cancel(core: &Arc<Core>, req: &mut Req) -> ApiResult {
    recording_operation(core, req, "canceled")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_types_follow_stasis_app_bridge_create() {
        assert_eq!(parse_bridge_type(""), Some((false, false, false, "talker")));
        assert_eq!(
            parse_bridge_type("mixing,dtmf_events"),
            Some((false, true, false, "talker"))
        );
        assert_eq!(
            parse_bridge_type("holding"),
            Some((true, false, false, "talker"))
        );
        assert_eq!(
            parse_bridge_type("mixing, proxy_media,video_sfu"),
            Some((false, false, true, "sfu"))
        );
        assert_eq!(parse_bridge_type("mixing,holding"), None);
        assert_eq!(parse_bridge_type("dtmf_events"), None);
        assert_eq!(parse_bridge_type("nonsense"), None);
    }

    #[test]
    fn caller_id_parsing() {
        assert_eq!(
            parse_callerid("\"Bob\" <100>"),
            ("Bob".into(), "100".into())
        );
        assert_eq!(
            parse_callerid("Bob <+1 555-0100>"),
            ("Bob".into(), "+1 555-0100".into())
        );
        assert_eq!(
            parse_callerid("+1 (555) 0100"),
            (String::new(), "+15550100".into())
        );
        assert_eq!(
            parse_callerid("Reception"),
            ("Reception".into(), String::new())
        );
    }
}
