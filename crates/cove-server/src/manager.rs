//! The sandbox manager: the one owner of every sandbox's state.
//!
//! ```text
//!   create ──▶ starting ──▶ running ◀────▶ paused
//!                 │           │  │   pause/resume (freezer)
//!                 ▼           │  └──(delete / TTL expired)──▶ stopping ──▶ stopped
//!               failed ◀──────┘ (agent lost)
//! ```
//!
//! Routes never touch the store or a backend: they call the manager. Each
//! transition is written to SQLite before it is acted on (`stopping` before
//! the kill, `paused` before the freeze), and transitions of one sandbox
//! are serialized by its operation lock, so a delete waits for a create in
//! progress and a pause never races a resume. The TTL is enforced here by
//! the reaper task, never by clients. After a restart, [`Manager::recover`]
//! reattaches running sandboxes and marks the ones whose agent died as
//! failed, with the reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use cove_api::{
    CreateSandboxRequest, CreateTemplateRequest, ErrorCode, Limits as ApiLimits, Sandbox,
    SandboxList, SandboxState, TemplateInfo,
};
use cove_protocol::client::{AgentClient, ChunkReader};
use cove_template::{Template, TemplateError, TemplateStore};
use tokio::sync::{Notify, watch};

use crate::auth::Principal;
use crate::backend::{Backend, BackendError, Instance, SandboxSpec};
use crate::engine::{self, SandboxOptions};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{SandboxRow, Store, StoreError, now_ms};

/// How long ended sandboxes stay listed.
const RETENTION_MS: i64 = 60 * 60 * 1000;
/// How long an exec waits for a starting sandbox.
const START_WAIT: Duration = Duration::from_secs(60);

/// Settings of the manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub cgroup_parent: String,
    pub default_backend: String,
    /// Per-sandbox networking (egress, published ports); `None`: only
    /// `network: "none"` without published ports is accepted.
    pub network: Option<cove_net::Network>,
}

/// One live sandbox.
pub struct Entry {
    pub id: String,
    pub owner: String,
    view: Mutex<Sandbox>,
    expires_at: Mutex<Option<i64>>,
    state: watch::Sender<SandboxState>,
    op: Arc<tokio::sync::Mutex<()>>,
    created_ms: i64,
    instance: Mutex<Option<Arc<dyn Instance>>>,
    agent: Mutex<Option<AgentClient>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Entry {
    pub fn state(&self) -> SandboxState {
        *self.state.borrow()
    }

    pub fn view(&self) -> Sandbox {
        let mut view = lock(&self.view).clone();
        view.state = self.state();
        view.expires_at = lock(&self.expires_at).map(|t| cove_api::rfc3339_millis(t as u64));
        view
    }

    fn set(&self, state: SandboxState, reason: Option<String>) {
        {
            let mut view = lock(&self.view);
            view.state = state;
            if reason.is_some() {
                view.reason = reason;
            }
            let now = cove_api::rfc3339_millis(now_ms() as u64);
            match state {
                SandboxState::Running if view.started_at.is_none() => view.started_at = Some(now),
                SandboxState::Stopped | SandboxState::Failed => view.stopped_at = Some(now),
                _ => {}
            }
        }
        self.state.send_replace(state);
    }

    pub fn instance(&self) -> Option<Arc<dyn Instance>> {
        lock(&self.instance).clone()
    }

    /// The agent connection, if one is open and alive.
    fn agent(&self) -> Option<AgentClient> {
        lock(&self.agent).clone().filter(|c| c.closed().is_none())
    }
}

/// The manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    templates: TemplateStore,
    backends: BTreeMap<String, Arc<dyn Backend>>,
    config: ManagerConfig,
    live: RwLock<HashMap<String, Arc<Entry>>>,
    metrics: Arc<Metrics>,
    reaper: Notify,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::DiskFull => ApiError::new(ErrorCode::InsufficientStorage, err.to_string()),
            other => ApiError::new(ErrorCode::Internal, other.to_string()),
        }
    }
}

fn backend_error(err: BackendError) -> ApiError {
    match err {
        BackendError::Invalid(msg) => ApiError::new(ErrorCode::InvalidRequest, msg),
        BackendError::Failed(msg) => ApiError::new(ErrorCode::Internal, msg),
        BackendError::Unreachable(msg) => ApiError::new(ErrorCode::AgentUnreachable, msg),
    }
}

fn parse_state(s: &str) -> SandboxState {
    SandboxState::parse(s).unwrap_or(SandboxState::Failed)
}

/// The stored spec of a sandbox: what is needed to describe it again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredSpec {
    cwd: String,
    user: Option<String>,
    limits: ApiLimits,
    #[serde(default)]
    pause_on_timeout: bool,
    #[serde(default)]
    auto_resume: bool,
    /// The sandbox's network (address, policy, published ports).
    #[serde(default)]
    network: cove_net::Stored,
    /// The template's layers when the sandbox was created, topmost first
    /// (what a snapshot stacks on, even if the template is replaced).
    #[serde(default)]
    layers: Vec<cove_template::Digest>,
}

/// A network error as the API shows it.
fn net_error(err: cove_net::NetError) -> ApiError {
    use cove_net::NetError;
    match err {
        NetError::Invalid(msg) => ApiError::new(ErrorCode::InvalidRequest, msg),
        NetError::PortInUse(msg) => ApiError::new(ErrorCode::Conflict, msg),
        NetError::Unavailable(msg) => ApiError::new(ErrorCode::Unavailable, msg),
        NetError::Host(msg) => {
            ApiError::internal(format!("setting up the sandbox's network: {msg}"))
        }
    }
}

fn stored_network(row: &SandboxRow) -> cove_net::Stored {
    serde_json::from_str::<StoredSpec>(&row.spec)
        .map(|s| s.network)
        .unwrap_or_default()
}

fn view_from_row(row: &SandboxRow) -> Sandbox {
    let spec: Option<StoredSpec> = serde_json::from_str(&row.spec).ok();
    Sandbox {
        id: row.id.clone(),
        state: parse_state(&row.state),
        reason: row.reason.clone(),
        template: row.template.clone(),
        backend: row.backend.clone(),
        cwd: spec
            .as_ref()
            .map(|s| s.cwd.clone())
            .unwrap_or_else(|| "/workspace".into()),
        user: spec.as_ref().and_then(|s| s.user.clone()),
        on_timeout: if spec.as_ref().is_some_and(|s| s.pause_on_timeout) {
            "pause".into()
        } else {
            "kill".into()
        },
        auto_resume: spec.as_ref().is_some_and(|s| s.auto_resume),
        network: spec.as_ref().map(|s| s.network.info()).unwrap_or_default(),
        limits: spec.map(|s| s.limits).unwrap_or_default(),
        labels: serde_json::from_str(&row.labels).unwrap_or_default(),
        metadata: serde_json::from_str(&row.metadata).unwrap_or_default(),
        created_at: cove_api::rfc3339_millis(row.created_at as u64),
        started_at: row.started_at.map(|t| cove_api::rfc3339_millis(t as u64)),
        expires_at: row.expires_at.map(|t| cove_api::rfc3339_millis(t as u64)),
        stopped_at: row.stopped_at.map(|t| cove_api::rfc3339_millis(t as u64)),
    }
}

/// Filters and paging of a sandbox listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<SandboxState>,
    pub labels: Vec<(String, String)>,
    pub limit: usize,
    /// `<created_at ms>:<id>` of the last item of the previous page.
    pub after: Option<(i64, String)>,
    /// Only sandboxes that have not ended (before the page is cut, so a
    /// page holds `limit` of them when there are that many).
    pub live_only: bool,
}

impl Manager {
    pub fn new(
        store: Store,
        templates: TemplateStore,
        backends: Vec<Arc<dyn Backend>>,
        config: ManagerConfig,
        metrics: Arc<Metrics>,
    ) -> Manager {
        let backends = backends
            .into_iter()
            .map(|b| (b.name().to_string(), b))
            .collect();
        Manager {
            inner: Arc::new(Inner {
                store,
                templates,
                backends,
                config,
                live: RwLock::new(HashMap::new()),
                metrics,
                reaper: Notify::new(),
            }),
        }
    }

    pub fn templates(&self) -> &TemplateStore {
        &self.inner.templates
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Count of live sandboxes per state.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> =
            SandboxState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for entry in self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            *counts.entry(entry.state().as_str()).or_default() += 1;
        }
        counts
    }

    fn live(&self, id: &str) -> Option<Arc<Entry>> {
        self.inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn forget(&self, id: &str) {
        self.inner
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// The live entry of sandbox `id` as `who` may see it, or the reason why not.
    pub async fn entry(&self, who: &Principal, id: &str) -> Result<Arc<Entry>, ApiError> {
        validate_id(id)?;
        if let Some(entry) = self.live(id).filter(|e| who.sees(&e.owner)) {
            return Ok(entry);
        }
        match self.inner.store.get_sandbox(id).await? {
            Some(row) if who.sees(&row.owner) => Err(ApiError::new(
                ErrorCode::SandboxStopped,
                format!(
                    "sandbox {id} has {}{}",
                    row.state,
                    row.reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            )),
            _ => Err(not_found(id)),
        }
    }

    /// Describe sandbox `id`, live or ended.
    pub async fn get(&self, who: &Principal, id: &str) -> Result<Sandbox, ApiError> {
        validate_id(id)?;
        if let Some(entry) = self.live(id).filter(|e| who.sees(&e.owner)) {
            return Ok(entry.view());
        }
        match self.inner.store.get_sandbox(id).await? {
            Some(row) if who.sees(&row.owner) => Ok(view_from_row(&row)),
            _ => Err(not_found(id)),
        }
    }

    /// List what `who` may see: live sandboxes and recently ended ones.
    pub async fn list(&self, who: &Principal, filter: ListFilter) -> Result<SandboxList, ApiError> {
        let mut items: Vec<(i64, Sandbox)> = Vec::new();
        let live: Vec<Arc<Entry>> = self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut seen = std::collections::HashSet::new();
        for entry in live.iter().filter(|e| who.sees(&e.owner)) {
            let view = entry.view();
            seen.insert(view.id.clone());
            items.push((entry.created_ms, view));
        }
        if !filter.live_only && filter.state.is_none_or(|s| s.is_final()) {
            let owner = if who.is_admin() {
                None
            } else {
                Some(who.owner.clone())
            };
            for row in self.inner.store.ended_sandboxes(owner).await? {
                if !seen.contains(&row.id) {
                    items.push((row.created_at, view_from_row(&row)));
                }
            }
        }
        items.retain(|(_, s)| {
            !(filter.live_only && s.state.is_final())
                && filter.state.is_none_or(|st| s.state == st)
                && filter
                    .labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v))
        });
        items.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        if let Some((t, id)) = &filter.after {
            items.retain(|(ct, s)| (*ct, &s.id) > (*t, id));
        }
        let limit = filter.limit.clamp(1, 1000);
        let next_cursor = (items.len() > limit).then(|| {
            let (t, s) = &items[limit - 1];
            format!("{t}:{}", s.id)
        });
        items.truncate(limit);
        Ok(SandboxList {
            sandboxes: items.into_iter().map(|(_, s)| s).collect(),
            next_cursor,
        })
    }

    /// Create a sandbox for `who`. With `wait`, return once it runs (or failed).
    pub async fn create(
        &self,
        who: &Principal,
        req: CreateSandboxRequest,
        wait: bool,
    ) -> Result<Sandbox, ApiError> {
        self.create_with_id(who, req, wait, None).await
    }

    /// Create a sandbox with a given ID (a dialect's machine that is started
    /// again after a stop keeps its ID). An ended sandbox of that ID is
    /// forgotten first; a live one is a conflict.
    pub async fn create_with_id(
        &self,
        who: &Principal,
        req: CreateSandboxRequest,
        wait: bool,
        fixed_id: Option<String>,
    ) -> Result<Sandbox, ApiError> {
        let backend_name = req
            .backend
            .clone()
            .unwrap_or_else(|| self.inner.config.default_backend.clone());
        let Some(backend) = self.inner.backends.get(&backend_name).cloned() else {
            let known: Vec<&str> = self.inner.backends.keys().map(String::as_str).collect();
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "unknown backend {backend_name:?}; this daemon offers: {}",
                    known.join(", ")
                ),
            ));
        };
        if let Some(why) = backend.unavailable() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the {backend_name} backend is not available on this host: {why}"),
            ));
        }
        let wants_network = req.network.effective_mode() != cove_api::NetworkMode::None
            || !req.network.exposed_ports.is_empty();
        cove_net::Network::validate(&req.network).map_err(net_error)?;
        let network = match (&self.inner.config.network, wants_network) {
            (_, false) => None,
            (_, true) if !backend.supports_network() => {
                return Err(ApiError::invalid(format!(
                    "backend {backend_name:?} does not support network \"egress\" or exposed_ports yet; use the namespace backend or network \"none\""
                )));
            }
            (_, true)
                if !req.network.exposed_ports.is_empty() && !backend.supports_published_ports() =>
            {
                return Err(ApiError::invalid(format!(
                    "backend {backend_name:?} does not publish exposed_ports yet (egress works); \
                     use the namespace backend for a server the host reaches"
                )));
            }
            (None, true) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "this daemon has no sandbox networking (see its log); only network \"none\" without exposed_ports works",
                ));
            }
            (Some(network), true) => Some(network.clone()),
        };
        let template_name = req
            .template
            .clone()
            .or_else(|| backend.default_template().map(String::from))
            .unwrap_or_else(|| cove_template::DEFAULT_TEMPLATE.into());
        let templates = self.inner.templates.clone();
        let template = tokio::task::spawn_blocking(move || templates.get(&template_name))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| match e {
                cove_template::TemplateError::Unknown { .. }
                | cove_template::TemplateError::BadName(_) => {
                    ApiError::new(ErrorCode::InvalidRequest, e.to_string())
                }
                other => ApiError::internal(other.to_string()),
            })?;
        let limits = cove_isolate::Limits {
            memory: req.memory.map(|m| m.0),
            cpus: req.cpus,
            pids: req.pids,
        };
        engine::validate_limits(&limits)
            .map_err(|m| ApiError::new(ErrorCode::InvalidRequest, m))?;
        let disk = req.disk.map(|d| d.0).unwrap_or(engine::DEFAULT_DISK);
        if disk < 1 << 20 {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("disk {disk} bytes is below the minimum of 1M"),
            ));
        }
        for key in req.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("env name {key:?} is empty or contains '=' or NUL"),
                ));
            }
        }
        if let Some(cwd) = &req.cwd
            && !cwd.starts_with('/')
        {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("cwd {cwd:?} must be an absolute path"),
            ));
        }
        let options = SandboxOptions {
            limits: limits.clone(),
            disk: Some(disk),
            env: req.env.clone().into_iter().collect(),
            cwd: req.cwd.clone(),
            user: req.user.clone(),
            cgroup_parent: self.inner.config.cgroup_parent.clone(),
            resolv_conf: None,
            guest_network: None,
        };
        let cwd = options
            .cwd
            .clone()
            .or_else(|| template.meta.config.working_dir.clone())
            .unwrap_or_else(|| "/workspace".into());
        let user = options
            .user
            .clone()
            .or_else(|| template.meta.config.user.clone());
        let api_limits = ApiLimits {
            memory: limits.memory,
            cpus: limits.cpus,
            pids: limits.pids,
            disk,
        };

        let id = match fixed_id {
            Some(id) => {
                validate_id(&id)?;
                if self.live(&id).is_some() {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("sandbox {id} is already running"),
                    ));
                }
                self.inner.store.forget_sandbox(&id).await?;
                id
            }
            None => loop {
                let id = engine::new_id();
                if self.live(&id).is_none() && self.inner.store.get_sandbox(&id).await?.is_none() {
                    break id;
                }
            },
        };
        let now = now_ms();
        let expires_at = match req.timeout {
            Some(t) if !t.0.is_zero() => Some(now + t.0.as_millis() as i64),
            _ => None,
        };
        let pause_on_timeout = match req.on_timeout.as_deref() {
            None | Some("kill") => false,
            Some("pause") => true,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "on_timeout {other:?} must be \"kill\" or \"pause\""
                )));
            }
        };
        // Take what can fail for the request's own reasons (host names,
        // host ports, an address) before anything is created.
        let mut prepared = match &network {
            Some(network) => Some(
                network
                    .prepare(&id, &req.network)
                    .await
                    .map_err(net_error)?,
            ),
            None => None,
        };
        let mut options = options;
        options.resolv_conf = prepared.as_ref().and_then(|p| p.resolv_conf());
        if let (Some(p), Some(tap)) = (prepared.as_mut(), backend.guest_link()) {
            p.set_guest_link(tap);
            let s = p.stored();
            if let (Some(address), Some(gateway), Some(prefix)) = (s.address, s.gateway, s.prefix) {
                options.guest_network = Some(cove_agent::vm_init::GuestNetwork {
                    address,
                    prefix,
                    gateway,
                    nameserver: gateway,
                });
            }
        }
        let spec_json = serde_json::to_string(&StoredSpec {
            cwd: cwd.clone(),
            user: user.clone(),
            limits: api_limits.clone(),
            pause_on_timeout,
            auto_resume: req.auto_resume,
            network: prepared
                .as_ref()
                .map(|p| p.stored().clone())
                .unwrap_or_default(),
            layers: template.meta.layers.clone(),
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
        let row = SandboxRow {
            id: id.clone(),
            owner: who.owner.clone(),
            state: SandboxState::Starting.as_str().into(),
            reason: None,
            template: template.name().to_string(),
            backend: backend_name.clone(),
            spec: spec_json,
            record: None,
            labels: serde_json::to_string(&req.labels).unwrap_or_else(|_| "{}".into()),
            metadata: serde_json::to_string(&req.metadata).unwrap_or_else(|_| "{}".into()),
            created_at: now,
            started_at: None,
            stopped_at: None,
            expires_at,
        };
        let view = view_from_row(&row);
        match self.inner.store.insert_sandbox(row).await {
            Ok(()) => {}
            // Another create of the same fixed ID (two `start`s of one
            // machine at once) got there first.
            Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("sandbox {id} is already being created"),
                ));
            }
            Err(err) => return Err(err.into()),
        }
        let entry = Arc::new(Entry {
            id: id.clone(),
            owner: who.owner.clone(),
            view: Mutex::new(view),
            expires_at: Mutex::new(expires_at),
            state: watch::channel(SandboxState::Starting).0,
            op: Arc::new(tokio::sync::Mutex::new(())),
            created_ms: now,
            instance: Mutex::new(None),
            agent: Mutex::new(None),
        });
        self.inner
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), entry.clone());
        self.inner.reaper.notify_one();

        // Creation holds the operation lock from the start, so a delete
        // that arrives meanwhile waits for it.
        let guard = entry.op.clone().lock_owned().await;
        let spec = SandboxSpec {
            id: id.clone(),
            template,
            options,
        };
        let manager = self.clone();
        let task_entry = entry.clone();
        let started = tokio::spawn(async move {
            let _guard = guard;
            manager.start(task_entry, backend, spec, prepared).await
        });
        if !wait {
            return Ok(entry.view());
        }
        match started.await {
            Ok(Ok(())) => {
                self.inner
                    .metrics
                    .creates
                    .get_or_create(&vec![("result".into(), "ok".into())])
                    .inc();
                Ok(entry.view())
            }
            Ok(Err(err)) => {
                self.inner
                    .metrics
                    .creates
                    .get_or_create(&vec![("result".into(), "error".into())])
                    .inc();
                Err(err)
            }
            Err(err) => Err(ApiError::internal(format!(
                "sandbox creation panicked: {err}"
            ))),
        }
    }

    /// Bring a sandbox from `starting` to `running` (or `failed`).
    async fn start(
        &self,
        entry: Arc<Entry>,
        backend: Arc<dyn Backend>,
        spec: SandboxSpec,
        prepared: Option<cove_net::Prepared>,
    ) -> Result<(), ApiError> {
        let id = spec.id.clone();
        let begun = std::time::Instant::now();
        let created = backend.create(spec).await;
        let created_at = begun.elapsed();
        let result = match created {
            Ok(instance) => match self.attach_network(&id, instance.as_ref(), prepared).await {
                Ok(()) => {
                    // The database learns that the sandbox runs while its
                    // agent says hello; nobody sees it running before both
                    // succeed (never a running sandbox the database does
                    // not know of). A failure overwrites the row below.
                    let record = instance.record().to_string();
                    let running = SandboxState::Running.as_str();
                    let (agent, recorded) = tokio::join!(
                        connect(instance.as_ref()),
                        self.inner.store.set_state(&id, running, None, Some(record)),
                    );
                    match agent.and_then(|agent| recorded.map(|()| agent).map_err(ApiError::from)) {
                        Ok(agent) => Ok((instance, agent)),
                        Err(err) => {
                            let _ = instance.destroy().await;
                            self.detach_network(&id).await;
                            Err(err)
                        }
                    }
                }
                Err(err) => {
                    let _ = instance.destroy().await;
                    Err(err)
                }
            },
            Err(err) => Err(backend_error(err)),
        };
        match result {
            Ok((instance, agent)) => {
                tracing::debug!(
                    %id,
                    backend_us = created_at.as_micros() as u64,
                    total_us = begun.elapsed().as_micros() as u64,
                    "sandbox started (backend: the sandbox made; total: and its network attached, its agent greeted, its state written)"
                );
                *lock(&entry.instance) = Some(instance.clone());
                *lock(&entry.agent) = Some(agent);
                entry.set(SandboxState::Running, None);
                self.monitor(entry, instance);
                Ok(())
            }
            Err(err) => {
                let reason = err.message.clone();
                tracing::warn!(%id, %reason, "sandbox failed to start");
                let _ = self
                    .inner
                    .store
                    .set_state(
                        &id,
                        SandboxState::Failed.as_str(),
                        Some(reason.clone()),
                        None,
                    )
                    .await;
                entry.set(SandboxState::Failed, Some(reason));
                self.forget(&id);
                backend.clean_up(&id, None).await;
                Err(err)
            }
        }
    }

    /// Wire a created sandbox's network (nothing to do without one). On
    /// failure nothing of it is left on the host.
    async fn attach_network(
        &self,
        id: &str,
        instance: &dyn Instance,
        prepared: Option<cove_net::Prepared>,
    ) -> Result<(), ApiError> {
        let (Some(network), Some(prepared)) = (&self.inner.config.network, prepared) else {
            return Ok(());
        };
        if !prepared.needs_attach() {
            return Ok(());
        }
        let netns = instance.network_namespace().map_err(backend_error)?;
        let relay = instance.port_relay();
        network.attach(prepared, netns, relay).await.map_err(|err| {
            tracing::warn!(%id, %err, "wiring the sandbox's network failed");
            net_error(err)
        })
    }

    /// Remove a sandbox's veth, rules, address and published ports.
    async fn detach_network(&self, id: &str) {
        if let Some(network) = &self.inner.config.network {
            network.detach(id).await;
        }
    }

    /// Watch for the sandbox ending on its own (its agent died).
    fn monitor(&self, entry: Arc<Entry>, instance: Arc<dyn Instance>) {
        let manager = self.clone();
        tokio::spawn(async move {
            let reason = instance.exited().await;
            let _op = entry.op.lock().await;
            if entry.state().is_final() || entry.state() == SandboxState::Stopping {
                return;
            }
            tracing::warn!(id = %entry.id, %reason, "sandbox lost");
            let _ = manager
                .inner
                .store
                .set_state(
                    &entry.id,
                    SandboxState::Failed.as_str(),
                    Some(reason.clone()),
                    None,
                )
                .await;
            entry.set(SandboxState::Failed, Some(reason));
            let _ = instance.destroy().await;
            manager.detach_network(&entry.id).await;
            manager.forget(&entry.id);
        });
    }

    /// Forget an ended sandbox entirely (its listing row too).
    pub async fn forget_ended(&self, id: &str) -> Result<(), ApiError> {
        if self.live(id).is_none() {
            self.inner.store.forget_sandbox(id).await?;
        }
        Ok(())
    }

    /// Destroy a sandbox with a reason (a dialect's "stop"). Ending an ended
    /// sandbox is not an error.
    pub async fn stop_with_reason(
        &self,
        who: &Principal,
        id: &str,
        reason: &str,
    ) -> Result<(), ApiError> {
        match self.entry(who, id).await {
            Ok(entry) => self.stop(entry, reason.to_string()).await,
            Err(err) if err.code == ErrorCode::SandboxStopped => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The live entry of `id`, whoever owns it (for dialect adapters that
    /// have checked ownership themselves).
    pub fn live_entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.live(id)
    }

    /// Destroy a sandbox. Deleting an ended sandbox is not an error.
    pub async fn delete(&self, who: &Principal, id: &str) -> Result<(), ApiError> {
        match self.entry(who, id).await {
            Ok(entry) => self.stop(entry, "deleted".into()).await,
            Err(err) if err.code == ErrorCode::SandboxStopped => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn stop(&self, entry: Arc<Entry>, reason: String) -> Result<(), ApiError> {
        let _op = entry.op.lock().await;
        if entry.state().is_final() {
            return Ok(());
        }
        self.inner
            .store
            .set_state(&entry.id, SandboxState::Stopping.as_str(), None, None)
            .await?;
        entry.set(SandboxState::Stopping, None);
        *lock(&entry.agent) = None;
        let instance = lock(&entry.instance).take();
        if let Some(instance) = instance
            && let Err(err) = instance.destroy().await
        {
            tracing::warn!(id = %entry.id, %err, "destroy reported a problem");
        }
        self.detach_network(&entry.id).await;
        self.inner
            .store
            .set_state(
                &entry.id,
                SandboxState::Stopped.as_str(),
                Some(reason.clone()),
                None,
            )
            .await?;
        entry.set(SandboxState::Stopped, Some(reason));
        self.forget(&entry.id);
        Ok(())
    }

    pub async fn pause(&self, who: &Principal, id: &str) -> Result<Sandbox, ApiError> {
        let entry = self.entry(who, id).await?;
        self.set_paused(&entry, true).await?;
        Ok(entry.view())
    }

    pub async fn resume(&self, who: &Principal, id: &str) -> Result<Sandbox, ApiError> {
        let entry = self.entry(who, id).await?;
        self.set_paused(&entry, false).await?;
        Ok(entry.view())
    }

    /// Pause (freeze) or resume a sandbox: the transition is stored before
    /// the backend acts, and undone if it fails.
    async fn set_paused(&self, entry: &Arc<Entry>, pause: bool) -> Result<(), ApiError> {
        let _op = entry.op.lock().await;
        let (from, to) = if pause {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        match entry.state() {
            s if s == to => return Ok(()),
            s if s == from => {}
            other => return Err(state_error(&entry.id, other)),
        }
        let instance = entry.instance().ok_or_else(|| no_instance(&entry.id))?;
        self.inner
            .store
            .set_state(&entry.id, to.as_str(), None, None)
            .await?;
        let acted = if pause {
            instance.pause().await
        } else {
            instance.resume().await
        };
        if let Err(err) = acted {
            self.inner
                .store
                .set_state(&entry.id, from.as_str(), None, None)
                .await?;
            return Err(backend_error(err));
        }
        entry.set(to, None);
        if !pause
            && entry.agent().is_none()
            && let Ok(agent) = connect(instance.as_ref()).await
        {
            *lock(&entry.agent) = Some(agent);
        }
        Ok(())
    }

    /// Set the time to live, counted from now (zero: no limit).
    pub async fn set_timeout(
        &self,
        who: &Principal,
        id: &str,
        ttl: Duration,
    ) -> Result<Sandbox, ApiError> {
        let entry = self.entry(who, id).await?;
        let expires_at = (!ttl.is_zero()).then(|| now_ms() + ttl.as_millis() as i64);
        self.inner.store.set_expiry(&entry.id, expires_at).await?;
        *lock(&entry.expires_at) = expires_at;
        self.inner.reaper.notify_one();
        Ok(entry.view())
    }

    /// Wait until sandbox `id` is in `target` (or has ended), up to `timeout`.
    pub async fn wait(
        &self,
        who: &Principal,
        id: &str,
        target: SandboxState,
        timeout: Duration,
    ) -> Result<Sandbox, ApiError> {
        let entry = match self.entry(who, id).await {
            Ok(entry) => entry,
            Err(err) if err.code == ErrorCode::SandboxStopped => return self.get(who, id).await,
            Err(err) => return Err(err),
        };
        let mut rx = entry.state.subscribe();
        let reached =
            tokio::time::timeout(timeout, rx.wait_for(|s| *s == target || s.is_final())).await;
        match reached {
            Ok(_) => Ok(entry.view()),
            Err(_) => Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "sandbox {id} did not reach {} within {}",
                    target.as_str(),
                    cove_api::units::format_duration(timeout)
                ),
            )),
        }
    }

    /// The agent of a running sandbox, for exec. Waits for a starting
    /// sandbox; a paused one is a 409, an ended one a 410.
    pub async fn agent(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(Arc<Entry>, AgentClient), ApiError> {
        let entry = self.entry(who, id).await?;
        if entry.state() == SandboxState::Starting {
            let mut rx = entry.state.subscribe();
            let _ = tokio::time::timeout(START_WAIT, rx.wait_for(|s| *s != SandboxState::Starting))
                .await;
        }
        if entry.state() == SandboxState::Paused && entry.view().auto_resume {
            self.set_paused(&entry, false).await?;
        }
        match entry.state() {
            SandboxState::Running => {}
            other => return Err(state_error(&entry.id, other)),
        }
        if let Some(agent) = entry.agent() {
            return Ok((entry, agent));
        }
        // The connection broke: try once to reconnect.
        let instance = entry.instance().ok_or_else(|| no_instance(&entry.id))?;
        let agent = connect(instance.as_ref()).await?;
        *lock(&entry.agent) = Some(agent.clone());
        Ok((entry, agent))
    }

    /// An error of a request to `entry`'s agent as its client should see
    /// it: a connection lost because the sandbox was stopped meanwhile
    /// (deleted, killed, its TTL ran out) is that state's error (410), not
    /// an unreachable agent (502), which clients take for a fault to retry.
    pub async fn agent_error(&self, entry: &Entry, err: ApiError) -> ApiError {
        if err.code != ErrorCode::AgentUnreachable {
            return err;
        }
        // The stop that cut the connection may not have been recorded yet.
        let mut rx = entry.state.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_millis(250),
            rx.wait_for(|s| *s != SandboxState::Running),
        )
        .await;
        match entry.state() {
            SandboxState::Running => err,
            other => {
                let mut ended = state_error(&entry.id, other);
                ended.message.push_str("; what ran in it was ended with it");
                ended
            }
        }
    }

    /// A new, private connection to a running sandbox's agent, for a
    /// request that streams or subscribes (so it cannot disturb others).
    pub async fn fresh_agent(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(Arc<Entry>, AgentClient), ApiError> {
        let (entry, _) = self.agent(who, id).await?;
        let instance = entry.instance().ok_or_else(|| no_instance(&entry.id))?;
        let agent = connect(instance.as_ref()).await?;
        Ok((entry, agent))
    }

    /// A new connection of its own to the agent of running sandbox `id`,
    /// for one bulk file transfer (same checks as [`Manager::agent`]), so
    /// that a large transfer shares nothing with other requests; `None`
    /// when the sandbox's backend has no such connections (the transfer
    /// then goes over the shared one).
    pub async fn agent_stream(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Option<crate::backend::AgentStream>, ApiError> {
        let (entry, _) = self.agent(who, id).await?;
        let instance = entry.instance().ok_or_else(|| no_instance(&entry.id))?;
        if !instance.serves_transfers() {
            return Ok(None);
        }
        tokio::time::timeout(Duration::from_secs(10), instance.connect())
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::AgentUnreachable,
                    "the sandbox's agent did not answer within 10s",
                )
            })?
            .map(Some)
            .map_err(backend_error)
    }

    /// The backends of this daemon and whether each can create sandboxes.
    pub fn backends(&self) -> Vec<cove_api::BackendInfo> {
        self.inner
            .backends
            .values()
            .map(|b| {
                let reason = b.unavailable();
                cove_api::BackendInfo {
                    name: b.name().to_string(),
                    available: reason.is_none(),
                    reason,
                    default: b.name() == self.inner.config.default_backend,
                    default_template: b
                        .default_template()
                        .unwrap_or(cove_template::DEFAULT_TEMPLATE)
                        .to_string(),
                }
            })
            .collect()
    }

    /// The end (at most `max` bytes) of sandbox `id`'s console log: the
    /// live VM's, or the one kept for a VM that died.
    pub async fn console(&self, who: &Principal, id: &str, max: u64) -> Result<Vec<u8>, ApiError> {
        validate_id(id)?;
        let path = if let Some(entry) = self.live(id).filter(|e| who.sees(&e.owner)) {
            let backend = lock(&entry.view).backend.clone();
            match entry.instance() {
                Some(instance) => instance.console_log(),
                None => self
                    .inner
                    .backends
                    .get(&backend)
                    .and_then(|b| b.saved_console(id)),
            }
            .ok_or_else(|| no_console(id, &backend))?
        } else {
            match self.inner.store.get_sandbox(id).await? {
                Some(row) if who.sees(&row.owner) => self
                    .inner
                    .backends
                    .get(&row.backend)
                    .and_then(|b| b.saved_console(id))
                    .ok_or_else(|| no_console(id, &row.backend))?,
                _ => return Err(not_found(id)),
            }
        };
        tokio::task::spawn_blocking(move || read_tail(&path, max))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::new(ErrorCode::NotFound, format!("no console log: {e}")))
    }

    /// Templates as the API shows them.
    pub fn template_infos(&self) -> Vec<TemplateInfo> {
        self.inner
            .templates
            .list()
            .iter()
            .map(template_info)
            .collect()
    }

    /// One template as the API shows it.
    pub async fn template(&self, name: &str) -> Result<TemplateInfo, ApiError> {
        let templates = self.inner.templates.clone();
        let name = name.to_string();
        blocking(move || templates.get(&name))
            .await?
            .map(|t| template_info(&t))
            .map_err(template_error)
    }

    /// Remove a template (refused while a sandbox uses it).
    pub async fn delete_template(&self, name: &str) -> Result<(), ApiError> {
        let templates = self.inner.templates.clone();
        let name = name.to_string();
        blocking(move || templates.remove(&name))
            .await?
            .map_err(template_error)
    }

    /// Import or pull a template.
    pub async fn create_template(
        &self,
        req: CreateTemplateRequest,
    ) -> Result<TemplateInfo, ApiError> {
        let templates = self.inner.templates.clone();
        let template = match (req.source, req.reference) {
            (Some(source), None) => {
                let name = req.name.ok_or_else(|| {
                    ApiError::invalid("an import needs a `name` for the new template")
                })?;
                let options = cove_template::ImportOptions {
                    replace: req.replace,
                };
                blocking(move || {
                    templates.import(
                        &name,
                        std::path::Path::new(&source),
                        &options,
                        &cove_template::Quiet,
                    )
                })
                .await?
            }
            (None, Some(reference)) => {
                let options = cove_template::PullOptions {
                    name: req.name,
                    plain_http: req.plain_http,
                    insecure: req.insecure,
                    username: req.username,
                    password: req.password,
                    timeout: Duration::from_secs(req.timeout.unwrap_or(30).clamp(1, 3600)),
                    replace: req.replace,
                };
                templates
                    .pull(&reference, &options, Arc::new(cove_template::Quiet))
                    .await
            }
            _ => {
                return Err(ApiError::invalid(
                    "give exactly one of `source` (a path on the daemon's host) \
                     and `reference` (an image to pull)",
                ));
            }
        };
        template.map(|t| template_info(&t)).map_err(template_error)
    }

    /// Make template `name` of sandbox `id`'s filesystem: its writable
    /// layer over its template's layers. A running sandbox is frozen for
    /// the copy only.
    pub async fn snapshot(
        &self,
        who: &Principal,
        id: &str,
        name: &str,
    ) -> Result<TemplateInfo, ApiError> {
        let entry = self.entry(who, id).await?;
        let templates = self.inner.templates.clone();
        templates.check_new(name, false).map_err(template_error)?;
        let row = self
            .inner
            .store
            .get_sandbox(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let stored: Option<StoredSpec> = serde_json::from_str(&row.spec).ok();
        let template_name = row.template.clone();
        let lookup = templates.clone();
        let current = blocking(move || lookup.get(&template_name)).await?;
        let (kind, config, layers) = match (&current, stored) {
            (Ok(t), Some(spec)) if !spec.layers.is_empty() || t.meta.layers.is_empty() => {
                (t.meta.kind, t.meta.config.clone(), spec.layers)
            }
            (Ok(t), _) => (t.meta.kind, t.meta.config.clone(), t.meta.layers.clone()),
            (Err(e), _) => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("cannot snapshot {id}: its template {}: {e}", row.template),
                ));
            }
        };

        let _op = entry.op.lock().await;
        let state = entry.state();
        if !matches!(state, SandboxState::Running | SandboxState::Paused) {
            return Err(state_error(id, state));
        }
        let instance = entry
            .instance()
            .ok_or_else(|| ApiError::internal("the sandbox has no backend instance"))?;
        let staged = if instance.layer_in_guest() {
            // Its agent reads the layer, so the sandbox cannot be frozen
            // meanwhile: what a process writes during the copy may or may
            // not be in it.
            if state != SandboxState::Running {
                return Err(ApiError::new(
                    ErrorCode::SandboxPaused,
                    format!(
                        "sandbox {id} is paused, and a microVM's writable layer is read by its \
                         agent: resume it, then take the snapshot"
                    ),
                ));
            }
            let agent = entry.agent().ok_or_else(|| {
                ApiError::new(
                    ErrorCode::AgentUnreachable,
                    format!("the agent of sandbox {id} does not answer"),
                )
            })?;
            self.stage_guest_layer(&agent, id).await?
        } else {
            let upper = instance.writable_layer().map_err(backend_error)?;
            let freeze = state == SandboxState::Running;
            if freeze {
                instance.pause().await.map_err(backend_error)?;
            }
            let copier = templates.clone();
            let staged = blocking(move || copier.stage_snapshot(&upper)).await;
            if freeze {
                instance.resume().await.map_err(backend_error)?;
            }
            staged?.map_err(template_error)?
        };
        let source = cove_template::SnapshotSource {
            kind,
            layers,
            config,
            description: format!("snapshot of {id} ({})", row.template),
        };
        let name = name.to_string();
        let template = blocking(move || templates.finish_snapshot(staged, &name, source))
            .await?
            .map_err(template_error)?;
        Ok(template_info(&template))
    }

    /// Stage the writable layer that sandbox `id`'s agent sends as an
    /// image layer, unpacking it while it arrives.
    async fn stage_guest_layer(
        &self,
        agent: &AgentClient,
        id: &str,
    ) -> Result<cove_template::StagedSnapshot, ApiError> {
        let mut download = agent
            .fs_writable_layer()
            .await
            .map_err(crate::api::files::file_error)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let templates = self.inner.templates.clone();
        let what = format!("the writable layer of {id}");
        let unpack = tokio::task::spawn_blocking(move || {
            templates.stage_snapshot_layer(ChunkReader::new(rx), &what)
        });
        let mut failed = None;
        loop {
            match download.next_chunk().await {
                Ok(Some(chunk)) => {
                    if tx.send(Ok(chunk.into())).await.is_err() {
                        break; // the unpacking stopped; its error follows
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        drop(tx);
        let staged = unpack
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        // A broken download is an error even if what arrived unpacked.
        if let Some(err) = failed {
            return Err(crate::api::files::file_error(err));
        }
        staged.map_err(template_error)
    }

    /// Destroy sandboxes whose time is up; forget long-ended ones.
    pub fn spawn_reaper(&self) {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut last_purge = 0i64;
            loop {
                let now = now_ms();
                let entries: Vec<Arc<Entry>> = manager
                    .inner
                    .live
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect();
                let mut next: Option<i64> = None;
                for entry in entries {
                    let Some(at) = *lock(&entry.expires_at) else {
                        continue;
                    };
                    if at <= now
                        && !entry.state().is_final()
                        && entry.state() != SandboxState::Stopping
                    {
                        let m = manager.clone();
                        tokio::spawn(async move {
                            tracing::info!(id = %entry.id, "time to live expired");
                            let result = if entry.view().on_timeout == "pause" {
                                *lock(&entry.expires_at) = None;
                                let _ = m.inner.store.set_expiry(&entry.id, None).await;
                                if entry.state() == SandboxState::Paused {
                                    Ok(())
                                } else {
                                    m.set_paused(&entry, true).await
                                }
                            } else {
                                m.stop(entry, "the sandbox's timeout expired".into()).await
                            };
                            if let Err(err) = result {
                                tracing::warn!(error = %err.message, "acting on an expired sandbox failed");
                            }
                        });
                    } else if at > now {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
                if now - last_purge > 60_000 {
                    last_purge = now;
                    let _ = manager.inner.store.purge_ended(now - RETENTION_MS).await;
                }
                let sleep_ms = next.map_or(30_000, |n| (n - now).clamp(10, 30_000)) as u64;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                    _ = manager.inner.reaper.notified() => {}
                }
            }
        });
    }

    /// Find every sandbox the database says is alive: reattach the running
    /// ones, mark the ones whose agent died as failed, finish interrupted
    /// deletes, and remove host state nobody knows about.
    pub async fn recover(&self) -> Result<(), StoreError> {
        let rows = self.inner.store.live_sandboxes_blocking()?;
        let mut known = std::collections::HashSet::new();
        for row in rows {
            known.insert(row.id.clone());
            let Some(backend) = self.inner.backends.get(&row.backend).cloned() else {
                let reason = format!("backend {} is not available in this daemon", row.backend);
                self.inner
                    .store
                    .set_state(&row.id, "failed", Some(reason), None)
                    .await?;
                continue;
            };
            let record: Option<serde_json::Value> = row
                .record
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok());
            let state = parse_state(&row.state);
            let reattached = match (&record, state) {
                (Some(record), SandboxState::Running | SandboxState::Paused) => {
                    match backend.reattach(&row.id, record.clone()).await {
                        Ok(instance) if state == SandboxState::Paused => Ok((instance, None)),
                        Ok(instance) => match connect(instance.as_ref()).await {
                            Ok(agent) => Ok((instance, Some(agent))),
                            Err(err) => {
                                // An agent that died just before we looked
                                // may still be tearing down its namespaces.
                                let dying =
                                    tokio::time::timeout(Duration::from_secs(2), instance.exited())
                                        .await
                                        .is_ok();
                                let _ = instance.destroy().await;
                                Err(if dying {
                                    "its agent exited while the daemon was down".to_string()
                                } else {
                                    format!(
                                        "its agent does not answer after the daemon restarted: {}",
                                        err.message
                                    )
                                })
                            }
                        },
                        Err(err) => Err(format!(
                            "its agent exited while the daemon was down ({err})"
                        )),
                    }
                }
                (_, SandboxState::Starting) => {
                    Err("the daemon stopped while the sandbox was starting".into())
                }
                (_, SandboxState::Stopping) => Err(String::new()),
                _ => Err("the daemon lost track of the sandbox".into()),
            };
            match reattached {
                Ok((instance, agent)) => {
                    if let Some(network) = &self.inner.config.network {
                        let stored = stored_network(&row);
                        let recovered = match instance.network_namespace() {
                            Ok(netns) => {
                                let relay = instance.port_relay();
                                network.recover(&row.id, stored, netns, relay).await
                            }
                            // A sandbox without network on a backend without one.
                            Err(_) if stored == cove_net::Stored::default() => Ok(()),
                            Err(err) => Err(cove_net::NetError::Host(err.to_string())),
                        };
                        if let Err(err) = recovered {
                            tracing::warn!(id = %row.id, %err, "the sandbox's network could not be recovered");
                        }
                    }
                    let mut view = view_from_row(&row);
                    view.state = state;
                    let entry = Arc::new(Entry {
                        id: row.id.clone(),
                        owner: row.owner.clone(),
                        view: Mutex::new(view),
                        expires_at: Mutex::new(row.expires_at),
                        state: watch::channel(state).0,
                        op: Arc::new(tokio::sync::Mutex::new(())),
                        created_ms: row.created_at,
                        instance: Mutex::new(Some(instance.clone())),
                        agent: Mutex::new(agent),
                    });
                    self.inner
                        .live
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(row.id.clone(), entry.clone());
                    self.monitor(entry, instance);
                    tracing::info!(id = %row.id, state = state.as_str(), "reattached");
                }
                Err(reason) => {
                    backend.clean_up(&row.id, record).await;
                    if let Some(network) = &self.inner.config.network {
                        network.forget(&row.id).await;
                    }
                    let (state, reason) = if reason.is_empty() {
                        ("stopped", "deleted".to_string())
                    } else {
                        ("failed", reason)
                    };
                    tracing::warn!(id = %row.id, %reason, "not recovered");
                    self.inner
                        .store
                        .set_state(&row.id, state, Some(reason), None)
                        .await?;
                }
            }
        }
        for backend in self.inner.backends.values() {
            for id in backend.known_ids() {
                if !known.contains(&id) {
                    tracing::warn!(%id, "removing a sandbox the database does not know");
                    backend.clean_up(&id, None).await;
                }
            }
        }
        if let Some(network) = &self.inner.config.network {
            // Rules and veths of sandboxes that ended while the daemon was
            // down (the ones recovered above are attached, so kept).
            network.collect_garbage(&Default::default()).await;
        }
        Ok(())
    }
}

/// Connect to an instance's agent and greet it.
async fn connect(instance: &dyn Instance) -> Result<AgentClient, ApiError> {
    let attempt = async {
        let stream = instance.connect().await.map_err(backend_error)?;
        AgentClient::connect(stream, "cove-serve")
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::AgentUnreachable,
                    format!("the sandbox's agent does not answer: {e}"),
                )
            })
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                ErrorCode::AgentUnreachable,
                "the sandbox's agent did not answer within 10s",
            ))
        })
}

pub fn validate_id(id: &str) -> Result<(), ApiError> {
    let ok = id.len() == 12
        && id.starts_with("sbx-")
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "{:?} is not a sandbox ID (they look like sbx-1a2b3c4d)",
                id.chars().take(80).collect::<String>()
            ),
        ))
    }
}

/// Run blocking template-store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn template_info(t: &Template) -> TemplateInfo {
    TemplateInfo {
        name: t.meta.name.clone(),
        kind: t.meta.kind.as_str().into(),
        source: t.meta.source.clone(),
        created_at: (t.meta.created > 0).then(|| cove_api::rfc3339_millis(t.meta.created * 1000)),
        env: t.meta.config.env.iter().cloned().collect(),
        working_dir: t.meta.config.working_dir.clone(),
        user: t.meta.config.user.clone(),
        entrypoint: t.meta.config.entrypoint.clone(),
        cmd: t.meta.config.cmd.clone(),
        layers: t.meta.layers.iter().map(|d| d.to_string()).collect(),
    }
}

/// A template store error as the API answers it.
fn template_error(err: TemplateError) -> ApiError {
    let code = match &err {
        TemplateError::Unknown { .. } => ErrorCode::NotFound,
        TemplateError::BadName(_) | TemplateError::Image(_) | TemplateError::BuiltIn(_) => {
            ErrorCode::InvalidRequest
        }
        TemplateError::Exists(_) | TemplateError::InUse(_) | TemplateError::Outdated(_) => {
            ErrorCode::Conflict
        }
        TemplateError::Registry(_) => ErrorCode::RegistryFailed,
        TemplateError::RegistryTimeout(_) => ErrorCode::Timeout,
        TemplateError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            ErrorCode::InsufficientStorage
        }
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, err.to_string())
}

fn no_console(id: &str, backend: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        if backend == "microvm" {
            format!(
                "sandbox {id} has no console log any more (it is kept for an hour after a VM dies, not after a delete)"
            )
        } else {
            format!(
                "sandbox {id} runs on the {backend} backend, which has no console; only microVM sandboxes have one"
            )
        },
    )
}

/// The last `max` bytes of a file.
fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    file.take(max).read_to_end(&mut out)?;
    Ok(out)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no sandbox {id}"))
}

/// A running sandbox whose backend instance is gone (being recovered or
/// torn down): retryable, not a daemon bug.
fn no_instance(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("sandbox {id} has no running backend right now; retry in a moment"),
    )
}

fn state_error(id: &str, state: SandboxState) -> ApiError {
    match state {
        SandboxState::Paused => ApiError::new(
            ErrorCode::SandboxPaused,
            format!("sandbox {id} is paused; resume it first"),
        ),
        SandboxState::Stopping | SandboxState::Stopped | SandboxState::Failed => ApiError::new(
            ErrorCode::SandboxStopped,
            format!("sandbox {id} is {}", state.as_str()),
        ),
        SandboxState::Starting => ApiError::new(
            ErrorCode::Unavailable,
            format!("sandbox {id} is still starting; retry in a moment"),
        ),
        SandboxState::Running => {
            ApiError::new(ErrorCode::Conflict, format!("sandbox {id} is running"))
        }
    }
}
