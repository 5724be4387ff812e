//! Leaderboard HTTP API (docs/leaderboards.md): the boards' HTTP edge, over the
//! `leaderboard` service. Writes need a publisher key when keys are configured: game
//! servers write, browsers only read. Before any handler here runs, the
//! `api::intent` layer has refused writes without a JSON content type or from another
//! site's page, so a reset or a score cannot be forged through a visitor's browser.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{authorize, Scope};
use super::error::ApiError;
use super::publish::read_body;
use crate::auth::Grant;
use crate::error_code::{ErrorCode, Refusal};
use crate::leaderboard::friends::{entries, View};
use crate::leaderboard::ranking::ScoreMode;
use crate::leaderboard::season::rfc3339;
use crate::leaderboard::service::{
    ranked, BoardError, BoardOptions, Boards, ScoreInput, MAX_BATCH,
};
use crate::state::AppState;

/// Score batches may be larger than one publication: up to 1000 entries with metadata.
const MAX_SCORES_BODY: usize = 1024 * 1024;
const MAX_PAGE: usize = 1000;
const MAX_AROUND: usize = 100;
/// Boards per page of `GET /api/boards` unless `limit` says otherwise; at most `MAX_PAGE`.
const DEFAULT_BOARDS_PAGE: usize = 100;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/boards", get(list))
        .route(
            "/api/boards/{board}",
            get(page).put(put_board).post(put_board),
        )
        .route("/api/boards/{board}/scores", post(post_scores))
        .route("/api/boards/{board}/reset", post(reset))
        .route(
            "/api/boards/{board}/players/{player}",
            get(player).delete(delete_player),
        )
        .route("/api/boards/{board}/friends", get(friends))
        .route("/api/boards/{board}/seasons", get(seasons))
        .route("/api/boards/{board}/seasons/{season}", get(season_page))
        .route(
            "/api/boards/{board}/seasons/{season}/players/{player}",
            get(season_player),
        )
}

impl From<BoardError> for ApiError {
    fn from(e: BoardError) -> Self {
        match &e {
            BoardError::Invalid(_) => ApiError::new(ErrorCode::InvalidScore, e.to_string()),
            BoardError::NoBoard(_) => ApiError::new(ErrorCode::NoBoard, e.to_string()),
            BoardError::NoPlayer { .. } => ApiError::new(ErrorCode::NoPlayer, e.to_string()),
            BoardError::Conflict(_) => ApiError::new(ErrorCode::Conflict, e.to_string()),
            BoardError::NoTiebreak(_) => ApiError::new(ErrorCode::NoTiebreak, e.to_string()),
            // Nothing of the write was applied or shown; retrying later is safe. The cause
            // (with file paths) is logged by the service, not told to the client.
            BoardError::Unconfirmed(_) => ApiError::new(
                ErrorCode::StoreUnavailable,
                "the score store did not confirm this write: it may or may not have been \
                 applied; read the player's entry before retrying an increment",
            ),
            BoardError::Store(_) => ApiError::new(
                ErrorCode::StoreUnavailable,
                "the score store could not commit this write; nothing was applied, retry later",
            ),
            BoardError::TooManyBoards(_) => ApiError::new(ErrorCode::TooManyBoards, e.to_string()),
            BoardError::TooManyPlayers { .. } => {
                ApiError::new(ErrorCode::TooManyPlayers, e.to_string())
            }
        }
    }
}

fn bad_name(e: BoardError) -> ApiError {
    match e {
        BoardError::Invalid(m) => ApiError::new(ErrorCode::BadBoard, m),
        other => other.into(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// One page of boards in name order: `limit` (default 100, at most 1000, at least 1)
/// boards named after `cursor`, and the `next_cursor` to pass for the next page (absent
/// on the last). A cursor is a board name (any, not only an existing one), so a board is on
/// exactly one page however boards come and go meanwhile. Private boards are left out for
/// a reader whose token does not allow them, so their names are not told to whoever asks.
async fn list(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    if let Some(c) = &q.cursor {
        Boards::validate_name(c).map_err(|_| {
            ApiError::new(
                ErrorCode::BadQuery,
                "cursor must be a board name: the next_cursor of the previous page",
            )
        })?;
    }
    let grant = state.auth.grant_from_request(query.as_deref(), &headers)?;
    let limit = q.limit.unwrap_or(DEFAULT_BOARDS_PAGE).clamp(1, MAX_PAGE);
    let private = !state.auth.private.is_empty();
    let (boards, more) = state.boards.page(q.cursor.as_deref(), limit, |name| {
        !private || may_read(&state, name, grant.as_ref()).is_ok()
    });
    let next = boards.last().filter(|_| more).map(|b| b["name"].clone());
    let mut page = json!({ "boards": boards });
    if let Some(next) = next {
        page["next_cursor"] = next;
    }
    Ok(Json(page))
}

/// A board is private when its topic `board:{name}` is (docs/leaderboards.md). Checked
/// before the board is looked up, so a refused reader cannot tell which boards exist.
fn may_read(state: &AppState, board: &str, grant: Option<&Grant>) -> Result<(), Refusal> {
    state
        .auth
        .check_read(&crate::topic::board_topic(board), grant)
}

#[doc(hidden)] // pub for fuzz/fuzz_targets/query.rs
#[derive(Deserialize)]
pub struct PageQuery {
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

async fn page(
    State(state): State<Arc<AppState>>,
    Path(board): Path<String>,
    Query(q): Query<PageQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    Boards::validate_name(&board).map_err(bad_name)?;
    let grant = state.auth.grant_from_request(query.as_deref(), &headers)?;
    may_read(&state, &board, grant.as_ref())?;
    let limit = q.limit.unwrap_or(50).min(MAX_PAGE);
    let offset = q.offset.unwrap_or(0);
    let body = state.boards.with_board(&board, |b| {
        let entries = b.ranking.page(offset, limit);
        let mut page = json!({
            "board": b.name,
            "version": b.version,
            "players": b.ranking.len(),
            "watchers": b.watchers,
            "order": b.options.order,
            "mode": b.options.mode,
            "top": b.options.top,
            "season": b.season_json(),
            "options": b.options,
            "offset": offset,
            "limit": limit,
            "entries": ranked(&entries, b.options.tiebreak.is_some()),
        });
        if let Some(ends) = b.ends {
            page["next_reset"] = rfc3339(ends).into();
        }
        if let Some(t) = b.options.tiebreak {
            page["tiebreak"] = json!(t);
        }
        page
    })?;
    Ok(Json(body))
}

#[derive(Deserialize)]
struct SeasonsQuery {
    limit: Option<usize>,
    /// Seasons numbered below this one (the `next_cursor` of the previous page).
    cursor: Option<u64>,
}

/// The closed seasons a board keeps, newest first, a page at a time, with its current one.
async fn seasons(
    State(state): State<Arc<AppState>>,
    Path(board): Path<String>,
    Query(q): Query<SeasonsQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    Boards::validate_name(&board).map_err(bad_name)?;
    let grant = state.auth.grant_from_request(query.as_deref(), &headers)?;
    may_read(&state, &board, grant.as_ref())?;
    let limit = q.limit.unwrap_or(DEFAULT_BOARDS_PAGE).clamp(1, MAX_PAGE);
    let (all, current) = state.boards.seasons(&board).await?;
    let mut page: Vec<Value> = all
        .iter()
        .filter(|a| q.cursor.is_none_or(|c| a.season < c))
        .take(limit + 1)
        .map(|a| {
            json!({
                "number": a.season,
                "started": rfc3339(a.started),
                "ended": rfc3339(a.ended),
                "players": a.players,
            })
        })
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let mut body = json!({ "board": board, "season": current, "seasons": page });
    if more {
        body["next_cursor"] = page.last().expect("a full page")["number"].clone();
    }
    Ok(Json(body))
}

/// A closed season, `404 no_season` when the board does not keep it.
async fn archive(
    state: &AppState,
    board: &str,
    season: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Arc<crate::leaderboard::service::Archive>, ApiError> {
    Boards::validate_name(board).map_err(bad_name)?;
    let grant = state.auth.grant_from_request(query, headers)?;
    may_read(state, board, grant.as_ref())?;
    let n: u64 = season
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::BadQuery, "a season is a number (1, 2, ...)"))?;
    state.boards.season(board, n).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoSeason,
            format!("board {board:?} keeps no closed season {n}"),
        )
    })
}

async fn season_page(
    State(state): State<Arc<AppState>>,
    Path((board, season)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let a = archive(&state, &board, &season, query.as_deref(), &headers).await?;
    let limit = q.limit.unwrap_or(50).min(MAX_PAGE);
    let offset = q.offset.unwrap_or(0);
    let entries = a.ranking.page(offset, limit);
    let mut body = json!({
        "board": board,
        "season": {
            "number": a.info.season,
            "started": rfc3339(a.info.started),
            "ended": rfc3339(a.info.ended),
        },
        "players": a.ranking.len(),
        "order": a.ranking.order(),
        "offset": offset,
        "limit": limit,
        "entries": ranked(&entries, a.ranking.tiebreak().is_some()),
    });
    if let Some(t) = a.ranking.tiebreak() {
        body["tiebreak"] = json!(t);
    }
    Ok(Json(body))
}

async fn season_player(
    State(state): State<Arc<AppState>>,
    Path((board, season, player)): Path<(String, String, String)>,
    Query(q): Query<AroundQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let a = archive(&state, &board, &season, query.as_deref(), &headers).await?;
    let n = q.around.unwrap_or(0).min(MAX_AROUND);
    let around = a.ranking.around(&player, n).ok_or_else(|| {
        ApiError::from(BoardError::NoPlayer {
            board: board.clone(),
            player: player.clone(),
        })
    })?;
    let me = around
        .iter()
        .find(|(_, e)| *e.player == *player)
        .expect("around holds the player");
    let sub = a.ranking.tiebreak().is_some();
    let mine = serde_json::to_value(&ranked(std::slice::from_ref(me), sub)[0]).expect("entry");
    Ok(Json(json!({
        "board": board,
        "season": a.info.season,
        "players": a.ranking.len(),
        "entry": mine,
        "around": ranked(&around, sub),
    })))
}

#[doc(hidden)] // pub for fuzz/fuzz_targets/query.rs
#[derive(Deserialize)]
pub struct AroundQuery {
    pub around: Option<usize>,
}

async fn player(
    State(state): State<Arc<AppState>>,
    Path((board, player)): Path<(String, String)>,
    Query(q): Query<AroundQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    Boards::validate_name(&board).map_err(bad_name)?;
    let grant = state.auth.grant_from_request(query.as_deref(), &headers)?;
    may_read(&state, &board, grant.as_ref())?;
    let n = q.around.unwrap_or(0).min(MAX_AROUND);
    let body = state.boards.with_board(&board, |b| {
        let around = b.ranking.around(&player, n)?;
        let me = around.iter().find(|(_, e)| *e.player == *player)?;
        let sub = b.options.tiebreak.is_some();
        let mine = ranked(std::slice::from_ref(me), sub);
        let mine = serde_json::to_value(&mine[0]).expect("entry serializes");
        Some(json!({
            "board": b.name,
            "players": b.ranking.len(),
            "entry": mine,
            "around": ranked(&around, sub),
        }))
    })?;
    body.map(Json)
        .ok_or_else(|| BoardError::NoPlayer { board, player }.into())
}

#[derive(Deserialize)]
pub struct FriendsQuery {
    pub players: Option<String>,
}

/// A friends view read once: the ranking of `players=a,b,c` (1-`MAX_FRIENDS` distinct
/// ids), as the live topic `board:{b}:friends@a@b@c` shows it. The ids go through the
/// topic's checks (`Auth::check_read`), so what can be read here can be watched.
async fn friends(
    State(state): State<Arc<AppState>>,
    Path(board): Path<String>,
    Query(q): Query<FriendsQuery>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    Boards::validate_name(&board).map_err(bad_name)?;
    let grant = state.auth.grant_from_request(query.as_deref(), &headers)?;
    may_read(&state, &board, grant.as_ref())?;
    let players: Vec<&str> = q.players.as_deref().unwrap_or("").split(',').collect();
    let topic = crate::topic::friends_topic(&board, &players);
    state.auth.check_read(&topic, grant.as_ref())?;
    let body = state.boards.with_board(&board, |b| {
        let (found, missing) = entries(b.ranking, &players);
        let view = View::new(
            b.name,
            b.ranking.tiebreak().is_some(),
            b.version,
            b.season.number,
            b.ranking.len(),
            &players,
            &found,
            missing,
        );
        serde_json::to_value(view).expect("friends view serializes")
    })?;
    Ok(Json(body))
}

/// Forgets a player (one who asked to be): their entry leaves the current season durably,
/// and the top and the windows it was in are updated live; closed seasons the board keeps
/// forget it too (`seasons` lists them).
async fn delete_player(
    State(state): State<Arc<AppState>>,
    Path((board, player)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state.auth.publishers, &headers, Scope::Boards(&board))?;
    Boards::validate_name(&board).map_err(bad_name)?;
    let seasons = state
        .boards
        .delete_player(&board, &player)
        .await
        .map_err(bad_name)?;
    Ok(Json(
        json!({ "board": board, "player": player, "deleted": true, "seasons": seasons }),
    ))
}

async fn post_scores(
    State(state): State<Arc<AppState>>,
    Path(board): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let caller = authorize(&state.auth.publishers, &headers, Scope::Boards(&board))?;
    Boards::validate_name(&board).map_err(bad_name)?;
    let policy = state.board_policies.for_board(&board);
    if let Some(p) = policy {
        p.check_caller(&board, &caller)?;
    }
    let bytes = read_body(body, MAX_SCORES_BODY).await?;
    let inputs = parse_scores(&bytes)?;
    let mut reservation = None;
    if let Some(p) = policy {
        check_bounds(&state, p, &board, &inputs)?;
        reservation = state.board_policies.reserve(p, &board, &inputs)?;
    }
    let max_players = state
        .board_policies
        .max_players(&board, state.cfg.max_players_per_board);
    match state.boards.submit(&board, inputs, max_players).await {
        Ok(results) => {
            let season = results.first().map_or(1, |r| r.season);
            Ok(Json(
                json!({ "board": board, "season": season, "results": results }),
            ))
        }
        Err(e) => {
            // Only what was applied counts against the rate; an unconfirmed write may
            // have been, so it stays counted.
            if let Some(r) = reservation {
                if !matches!(e, BoardError::Unconfirmed(_)) {
                    state.board_policies.release(r);
                }
            }
            Err(e.into())
        }
    }
}

/// The policy's score bounds; on an `increment` board against each player's stored total
/// as well (a board not created yet has the default `best` mode).
fn check_bounds(
    state: &AppState,
    policy: &crate::leaderboard::policy::BoardPolicy,
    board: &str,
    inputs: &[ScoreInput],
) -> Result<(), ApiError> {
    if policy.min_score.is_none() && policy.max_score.is_none() {
        return Ok(());
    }
    let checked = state.boards.with_board(board, |b| {
        if b.options.mode != ScoreMode::Increment {
            return policy.check_bounds(inputs, None);
        }
        let current = |p: &str| b.ranking.get(p).map_or(0.0, |e| e.score);
        policy.check_bounds(inputs, Some(&current))
    });
    match checked {
        Ok(r) => Ok(r?),
        Err(BoardError::NoBoard(_)) => Ok(policy.check_bounds(inputs, None)?),
        Err(e) => Err(e.into()),
    }
}

/// One score object or an array of them, shape-checked; values are validated by `submit`.
#[doc(hidden)] // pub for fuzz/fuzz_targets/score_batch.rs
pub fn parse_scores(bytes: &[u8]) -> Result<Vec<ScoreInput>, ApiError> {
    let inputs: Vec<ScoreInput> = match serde_json::from_slice::<Value>(bytes) {
        // Refused before each item becomes a ScoreInput: a 1 MiB body of `{},` is ~350,000
        // items, which would otherwise all be converted only for `submit` to refuse them.
        Ok(Value::Array(items)) if items.len() > MAX_BATCH => {
            return Err(ApiError::new(
                ErrorCode::InvalidScore,
                format!("at most {MAX_BATCH} scores per request"),
            ))
        }
        Ok(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse_entry(i, v))
            .collect::<Result<_, _>>()?,
        Ok(v @ Value::Object(_)) => vec![parse_entry(0, v)?],
        Ok(_) => {
            return Err(ApiError::new(
                ErrorCode::BadJson,
                "send one score object or an array of them",
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                ErrorCode::BadJson,
                format!("the body is not JSON: {e}"),
            ))
        }
    };
    Ok(inputs)
}

fn parse_entry(i: usize, v: Value) -> Result<ScoreInput, ApiError> {
    serde_json::from_value(v)
        .map_err(|e| ApiError::new(ErrorCode::InvalidScore, format!("entry {i}: {e}")))
}

async fn put_board(
    State(state): State<Arc<AppState>>,
    Path(board): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&state.auth.publishers, &headers, Scope::Boards(&board))?;
    Boards::validate_name(&board).map_err(bad_name)?;
    let bytes = read_body(body, 4096).await?;
    let options: BoardOptions = if bytes.iter().all(u8::is_ascii_whitespace) {
        BoardOptions {
            top: state.cfg.board_top,
            ..BoardOptions::default()
        }
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(ErrorCode::BadOptions, format!("board options: {e}")))?
    };
    let options = state
        .boards
        .put_board(&board, options)
        .await
        .map_err(|e| match e {
            BoardError::Invalid(m) => ApiError::new(ErrorCode::BadOptions, m),
            other => other.into(),
        })?;
    Ok(Json(json!({ "board": board, "options": options })))
}

async fn reset(
    State(state): State<Arc<AppState>>,
    Path(board): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state.auth.publishers, &headers, Scope::Reset(&board))?;
    state.boards.reset(&board).await.map_err(bad_name)?;
    Ok(Json(json!({ "board": board, "reset": true })))
}
