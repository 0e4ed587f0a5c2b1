//! Machines: sandboxes that can be stopped and started again, as
//! Hyperfleet's machines and GBOX's boxes are. A machine is a row of its
//! own (name, sizes, status while stopped); while it runs, it *is* the
//! sandbox with the same ID, so every native feature works on it.
//!
//! ```text
//!   pending ──start──▶ (sandbox: starting ▶ running ⇄ paused) ──stop──▶ stopped ──start──▶ …
//!                                                            └─terminate/delete──▶ terminated / gone
//! ```
//!
//! Stopping discards the sandbox's writable layer: a started machine boots
//! from its template again.

use cove_api::{CreateSandboxRequest, ErrorCode, SandboxState};

use crate::api::AppState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::{MachineRow, now_ms};

/// Where a machine is, combining its row and its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    Pending,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
    Terminated,
}

pub(crate) struct Machine {
    pub row: MachineRow,
    pub state: MachineState,
    pub reason: Option<String>,
    pub expires_at: Option<String>,
}

fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no {kind} {id}"))
}

/// Load machine `id` of `kind` as `who` may see it.
pub(crate) async fn load(
    state: &AppState,
    who: &Principal,
    kind: &str,
    id: &str,
) -> Result<Machine, ApiError> {
    let row = state
        .manager
        .store()
        .get_machine(kind, id)
        .await?
        .filter(|r| who.sees(&r.owner));
    let Some(row) = row else {
        return Err(not_found(kind, id));
    };
    Ok(describe(state, row).await)
}

async fn describe(state: &AppState, row: MachineRow) -> Machine {
    if let Some(entry) = state.manager.live_entry(&row.id) {
        let view = entry.view();
        let machine_state = match view.state {
            SandboxState::Starting => MachineState::Starting,
            SandboxState::Running => MachineState::Running,
            SandboxState::Paused => MachineState::Paused,
            SandboxState::Stopping => MachineState::Stopping,
            SandboxState::Stopped => MachineState::Stopped,
            SandboxState::Failed => MachineState::Failed,
        };
        return Machine {
            row,
            state: machine_state,
            reason: view.reason,
            expires_at: view.expires_at,
        };
    }
    let (machine_state, reason) = match row.status.as_str() {
        "pending" => (MachineState::Pending, row.reason.clone()),
        "terminated" => (MachineState::Terminated, row.reason.clone()),
        "started" => {
            // The sandbox ended on its own (failed, or its TTL expired).
            let ended = state
                .manager
                .store()
                .get_sandbox(&row.id)
                .await
                .ok()
                .flatten();
            match ended {
                Some(s) if s.state == "failed" => (MachineState::Failed, s.reason),
                Some(s) => (MachineState::Stopped, s.reason),
                None => (MachineState::Stopped, None),
            }
        }
        _ => (MachineState::Stopped, row.reason.clone()),
    };
    Machine {
        row,
        state: machine_state,
        reason,
        expires_at: None,
    }
}

/// Every machine of `kind` that `who` sees.
pub(crate) async fn list(
    state: &AppState,
    who: &Principal,
    kind: &str,
) -> Result<Vec<Machine>, ApiError> {
    let owner = if who.is_admin() {
        None
    } else {
        Some(who.owner.clone())
    };
    let mut out = Vec::new();
    for row in state.manager.store().machines(kind, owner).await? {
        out.push(describe(state, row).await);
    }
    Ok(out)
}

/// Record a new machine (not started). `Ok(None)` when the name is taken.
pub(crate) async fn insert(
    state: &AppState,
    who: &Principal,
    kind: &str,
    name: &str,
    spec: &serde_json::Value,
) -> Result<Option<MachineRow>, ApiError> {
    let now = now_ms();
    let row = MachineRow {
        id: crate::engine::new_id(),
        kind: kind.into(),
        owner: who.owner.clone(),
        name: name.into(),
        spec: spec.to_string(),
        status: "pending".into(),
        reason: None,
        created_at: now,
        updated_at: now,
    };
    Ok(state
        .manager
        .store()
        .insert_machine(row.clone())
        .await?
        .then_some(row))
}

/// Start a machine: create its sandbox (same ID) from `req`.
pub(crate) async fn start(
    state: &AppState,
    who: &Principal,
    row: &MachineRow,
    req: CreateSandboxRequest,
    wait: bool,
) -> Result<(), ApiError> {
    state
        .manager
        .store()
        .set_machine_status(&row.id, "started", None)
        .await?;
    match state
        .manager
        .create_with_id(who, req, wait, Some(row.id.clone()))
        .await
    {
        Ok(_) => Ok(()),
        // A concurrent start of the same machine won: its status stands.
        Err(err) if err.code == ErrorCode::Conflict => Err(err),
        Err(err) => {
            state
                .manager
                .store()
                .set_machine_status(&row.id, "stopped", Some(err.message.clone()))
                .await?;
            Err(err)
        }
    }
}

/// Stop a machine: destroy its sandbox and remember it as `status`
/// (`stopped`, or `terminated` when it may not start again).
pub(crate) async fn stop(
    state: &AppState,
    who: &Principal,
    row: &MachineRow,
    status: &str,
    reason: &str,
) -> Result<(), ApiError> {
    match state.manager.stop_with_reason(who, &row.id, reason).await {
        Ok(()) => {}
        // No sandbox to stop: never started, failed to start, or ended
        // and forgotten. The machine's own row still changes.
        Err(err) if err.code == ErrorCode::NotFound => {}
        Err(err) => return Err(err),
    }
    state
        .manager
        .store()
        .set_machine_status(&row.id, status, Some(reason.into()))
        .await?;
    Ok(())
}

/// Forget a machine (its sandbox must have ended).
pub(crate) async fn remove(state: &AppState, row: &MachineRow) -> Result<(), ApiError> {
    state.manager.store().delete_machine(&row.id).await?;
    Ok(())
}
