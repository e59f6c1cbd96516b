//! The wasmtime host: one engine per process, a fresh sandboxed instance per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use policy_sdk as sdk;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};

use super::bindings::{self, PolicyPre, WORLD_VERSION};
use super::breaker::{Breaker, BreakerState, BreakerTransition, Clock, MonotonicClock};
use super::epoch::EpochTicker;
use super::pool::{EvalPool, Job};
use super::{PolicyConfig, PolicyError, Verdict};

/// Epoch tick: the granularity of policy deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Interface every policy must export, without its version.
const EVALUATOR: &str = "omnirelay:bootstrap-policy/evaluator";
/// Interfaces a policy may import, without their versions.
const ALLOWED_IMPORTS: &[&str] = &[
    "omnirelay:bootstrap-policy/host",
    "omnirelay:bootstrap-policy/types",
];

/// Whether calls count instructions (fuel). Metering slows every call, so the server runs
/// without it; `policy test` and CI run with it to enforce instruction budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    /// No fuel accounting: the production setting.
    Off,
    /// Count fuel on every call.
    Fuel,
}

/// The sha256 of a policy module: its identity in caches, audit entries and manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModuleDigest([u8; 32]);

impl ModuleDigest {
    /// Digest of the module bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Display for ModuleDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// A policy that compiled, linked and accepted its settings: ready to evaluate. Each loaded
/// version has its own circuit breaker and its own share of the host's slots (a candidate
/// version's vectors never trip the breaker of the version serving).
#[derive(Clone)]
pub struct LoadedPolicy {
    name: Arc<str>,
    digest: ModuleDigest,
    settings: Arc<str>,
    pre: PolicyPre<GuestState>,
    breaker: Arc<Breaker>,
    share: Arc<Semaphore>,
}

impl LoadedPolicy {
    /// `Err(CircuitOpen)` while this policy's breaker refuses calls: a caller can refuse
    /// before doing its own expensive work for a call that would be refused anyway.
    pub fn check_circuit(&self) -> Result<(), PolicyError> {
        match self.breaker.refusal() {
            Some(open) => Err(open),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl LoadedPolicy {
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module's digest.
    pub fn digest(&self) -> ModuleDigest {
        self.digest
    }

    /// Where its circuit breaker stands now.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }
}

/// The outcome of one metered call: what the policy decided and the fuel it burnt.
#[derive(Debug)]
pub struct Metered<T> {
    /// The result of the call.
    pub result: Result<T, PolicyError>,
    /// Fuel consumed (0 when metering is off).
    pub fuel: u64,
}

/// Runs policies. One per process (per metering mode): it owns the engine, the epoch ticker,
/// the instance pool, the evaluation semaphore and the channel breaker transitions go out on.
pub struct PolicyHost {
    sandbox: Arc<Sandbox>,
    linker: Linker<GuestState>,
    permits: Arc<Semaphore>,
    compiled: Mutex<HashMap<ModuleDigest, Component>>,
    clock: Arc<dyn Clock>,
    transitions: broadcast::Sender<BreakerTransition>,
    threads: Arc<EvalPool>,
    _ticker: EpochTicker,
}

/// What a blocking evaluation thread needs: shared with every call in flight.
struct Sandbox {
    engine: Engine,
    config: PolicyConfig,
    metering: Metering,
}

impl std::fmt::Debug for PolicyHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHost")
            .field("config", &self.sandbox.config)
            .field("metering", &self.sandbox.metering)
            .finish_non_exhaustive()
    }
}

/// Breaker transitions buffered for a slow reader; one that falls further behind is told how
/// many it missed (transitions are rare: at most two per policy per cooldown).
const TRANSITION_BACKLOG: usize = 256;

/// Per-call state inside the sandbox.
pub struct GuestState {
    limits: StoreLimits,
    policy: Arc<str>,
    /// This thread's CPU time when the call started (when the clock is available), the wall
    /// time, and the budget the call may use.
    cpu_start: Option<Duration>,
    wall_start: Instant,
    budget: Duration,
    memory_denied: bool,
    timed_out: bool,
    logs_left: u32,
    logs_dropped: u32,
    last_error_log: Option<String>,
}

impl PolicyHost {
    /// Builds the engine and starts the epoch ticker; breakers read the monotonic clock.
    pub fn new(config: PolicyConfig, metering: Metering) -> Result<Self, PolicyError> {
        Self::with_clock(config, metering, Arc::new(MonotonicClock))
    }

    /// [`PolicyHost::new`] with the clock the circuit breakers read (tests move a fake one).
    pub fn with_clock(
        config: PolicyConfig,
        metering: Metering,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, PolicyError> {
        let slots = config.max_concurrent.get();
        let mut pool = PoolingAllocationConfig::default();
        // One policy component is three core instances (the module, a shim and a fixup),
        // one memory and two tables.
        pool.total_component_instances(slots)
            .total_core_instances(slots * 4)
            .total_memories(slots)
            .total_tables(slots * 2)
            .total_stacks(slots)
            .max_core_instances_per_component(4)
            .max_memories_per_component(1)
            .max_tables_per_component(2)
            .max_memory_size(usize::try_from(config.memory_limit).unwrap_or(usize::MAX))
            // Reset a reused slot by rewriting just the pages the last call dirtied (found with
            // Linux's PAGEMAP_SCAN where the kernel has it) instead of madvise: no page-table
            // change, so no cross-core TLB shootdown and no page faults on the next call.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10);
        let mut wasm = wasmtime::Config::new();
        wasm.epoch_interruption(true)
            .consume_fuel(metering == Metering::Fuel)
            .max_wasm_stack(256 << 10)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(PolicyError::Engine)?;
        let mut linker = Linker::new(&engine);
        bindings::Policy::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s)
            .map_err(PolicyError::Link)?;
        let ticker = EpochTicker::start(engine.clone(), EPOCH_TICK).map_err(PolicyError::Ticker)?;
        Ok(Self {
            sandbox: Arc::new(Sandbox {
                engine,
                config,
                metering,
            }),
            linker,
            permits: Arc::new(Semaphore::new(slots as usize)),
            compiled: Mutex::new(HashMap::new()),
            clock,
            transitions: broadcast::channel(TRANSITION_BACKLOG).0,
            threads: Arc::new(EvalPool::default()),
            _ticker: ticker,
        })
    }

    /// The limits this host enforces.
    pub fn config(&self) -> &PolicyConfig {
        &self.sandbox.config
    }

    /// Every circuit-breaker transition from now on. The host owns neither metrics nor the
    /// store: the application drains this into both, so an opened breaker reaches the audit
    /// log. A receiver that falls 256 transitions behind is told how many it missed.
    pub fn breaker_transitions(&self) -> broadcast::Receiver<BreakerTransition> {
        self.transitions.subscribe()
    }

    /// Compiles (once per digest, on a blocking thread), checks the WIT world, links, and runs
    /// `validate-settings`. Never call this on a request path.
    pub async fn load(
        &self,
        name: &str,
        module: Vec<u8>,
        settings: &str,
    ) -> Result<LoadedPolicy, PolicyError> {
        let digest = ModuleDigest::of(&module);
        let component = self.compile(digest, module).await?;
        check_world(&self.sandbox.engine, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(PolicyPre::new)
            .map_err(PolicyError::Link)?;
        let name: Arc<str> = name.into();
        let config = &self.sandbox.config;
        let breaker = Breaker::new(
            name.clone(),
            digest,
            config.breaker_failures.get(),
            config.breaker_cooldown,
            self.clock.clone(),
            self.transitions.clone(),
        );
        let share = config.per_policy_slots.min(config.max_concurrent).get() as usize;
        let policy = LoadedPolicy {
            name,
            digest,
            settings: settings.into(),
            pre,
            breaker: Arc::new(breaker),
            share: Arc::new(Semaphore::new(share)),
        };
        self.validate_settings(&policy).await.result?;
        Ok(policy)
    }

    async fn compile(
        &self,
        digest: ModuleDigest,
        module: Vec<u8>,
    ) -> Result<Component, PolicyError> {
        if let Some(hit) = self.cached(digest) {
            return Ok(hit);
        }
        let engine = self.sandbox.engine.clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &module))
            .await
            .map_err(|join| PolicyError::Compile(wasmtime::Error::msg(join.to_string())))?
            .map_err(PolicyError::Compile)?;
        if let Ok(mut cache) = self.compiled.lock() {
            cache.insert(digest, component.clone());
        }
        Ok(component)
    }

    fn cached(&self, digest: ModuleDigest) -> Option<Component> {
        self.compiled.lock().ok()?.get(&digest).cloned()
    }

    /// Runs the policy's `validate-settings` on the settings it was loaded with.
    pub async fn validate_settings(&self, policy: &LoadedPolicy) -> Metered<()> {
        let settings = policy.settings.clone();
        self.call(policy, None, move |p, store| {
            let evaluator = p.omnirelay_bootstrap_policy_evaluator();
            evaluator
                .call_validate_settings(store, &settings)
                .map(|r| r.map_err(PolicyError::SettingsRejected))
        })
        .await
    }

    /// Decides one request in a fresh instance. The result is either a checked [`Verdict`] or
    /// a [`PolicyError`], which callers must treat as a refusal (fail closed).
    pub async fn evaluate(
        &self,
        policy: &LoadedPolicy,
        request: &sdk::Request,
    ) -> Result<Verdict, PolicyError> {
        self.evaluate_metered(policy, request, None).await.result
    }

    /// [`PolicyHost::evaluate`] with a fuel budget (when metering is on) and the fuel used.
    pub async fn evaluate_metered(
        &self,
        policy: &LoadedPolicy,
        request: &sdk::Request,
        budget: Option<u64>,
    ) -> Metered<Verdict> {
        let wit_request: bindings::WitRequest = request.into();
        let settings = policy.settings.clone();
        let config = self.sandbox.config.clone();
        self.call(policy, budget, move |p, store| {
            let evaluator = p.omnirelay_bootstrap_policy_evaluator();
            let raw = evaluator.call_evaluate(store, &settings, &wit_request)?;
            Ok(match raw {
                Ok(decision) => Verdict::check(decision.into(), &config).map_err(Into::into),
                Err(reported) => Err(PolicyError::Reported(reported.message)),
            })
        })
        .await
    }

    /// Asks the policy's breaker, takes a slot of the policy's share and one of the host's,
    /// then runs `f` in a fresh store and instance on a blocking thread, and turns every way the
    /// sandbox can fail into a typed [`PolicyError`].
    ///
    /// Where the guest runs: on the host's evaluation threads (`pool.rs`), never on a runtime
    /// worker. Inline, a runaway policy held a worker for its whole deadline, and eight of them
    /// raised another cluster's join p99 from 9 ms to 346 ms (issue #7). The guest still runs
    /// start to finish on one thread, so the deadline keeps counting that thread's CPU time:
    /// a busy machine cannot make a healthy policy time out. The hand-off (wake an evaluation
    /// thread, wake the caller's task) is the price; see `bench/README.md`. The threads are at
    /// most one per slot and reused warmest first: on tokio's blocking pool a call landing
    /// between one thread finishing and going idle started another thread, and the process
    /// grew by 9 MiB of warmed stacks over 10,000 evaluations. The slots go with the call to
    /// its thread and are freed once the thread is idle again: a caller that gives up (request
    /// deadline) does not free a slot while its guest still runs in it.
    async fn call<T, F>(&self, policy: &LoadedPolicy, budget: Option<u64>, f: F) -> Metered<T>
    where
        T: Send + 'static,
        F: FnOnce(
                &bindings::Policy,
                &mut Store<GuestState>,
            ) -> wasmtime::Result<Result<T, PolicyError>>
            + Send
            + 'static,
    {
        let refused = |error| Metered {
            result: Err(error),
            fuel: 0,
        };
        let ticket = match policy.breaker.admit() {
            Ok(ticket) => ticket,
            Err(open) => return refused(open),
        };
        // An unfinished ticket (shed here) tells the breaker the guest never ran.
        let slots = match self.slots(&policy.share).await {
            Ok(slots) => slots,
            Err(shed) => return refused(shed),
        };
        let sandbox = self.sandbox.clone();
        let (name, pre) = (policy.name.clone(), policy.pre.clone());
        let (answer, result) = tokio::sync::oneshot::channel();
        let run = Box::new(move || {
            let metered = sandbox.run(&name, &pre, budget, f);
            ticket.finish(&metered.result);
            let _ = answer.send(metered);
        });
        if let Err(e) = self.threads.submit(Job { run, slots }) {
            return refused(PolicyError::Thread(e));
        }
        // A thread that died mid-call (a panic in the host, never the guest's trap) drops
        // the sender: the call is lost, and failed closed like any other failure.
        result
            .await
            .unwrap_or_else(|_| refused(PolicyError::ThreadLost))
    }

    /// A slot of the policy's own share, then one of the host's. A policy at its share waits
    /// behind itself without holding a host slot, so other policies still find one. Both waits
    /// together are bounded by `queue_timeout`, then the caller is shed.
    async fn slots(
        &self,
        share: &Arc<Semaphore>,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), PolicyError> {
        // Fast path without arming a timer: free slots are the common case.
        if let Ok(own) = share.clone().try_acquire_owned()
            && let Ok(host) = self.permits.clone().try_acquire_owned()
        {
            return Ok((own, host));
        }
        let wait = self.sandbox.config.queue_timeout;
        let acquire = async {
            let own = share.clone().acquire_owned().await?;
            let host = self.permits.clone().acquire_owned().await?;
            Ok::<_, tokio::sync::AcquireError>((own, host))
        };
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(slots)) => Ok(slots),
            // The semaphores are never closed; a closed one means shutdown, so shed as overloaded.
            Ok(Err(_)) | Err(_) => Err(PolicyError::Overloaded(wait)),
        }
    }
}

impl Sandbox {
    /// Builds a fresh store and instance and runs `f` on the calling (blocking) thread.
    fn run<T>(
        &self,
        name: &Arc<str>,
        pre: &PolicyPre<GuestState>,
        budget: Option<u64>,
        f: impl FnOnce(
            &bindings::Policy,
            &mut Store<GuestState>,
        ) -> wasmtime::Result<Result<T, PolicyError>>,
    ) -> Metered<T> {
        let budget = budget.unwrap_or(u64::MAX);
        let mut store = self.store(name, budget);
        let outcome = match pre.instantiate(&mut store) {
            Ok(instance) => f(&instance, &mut store),
            Err(e) => Err(e),
        };
        let fuel = match self.metering {
            Metering::Fuel => budget.saturating_sub(store.get_fuel().unwrap_or(0)),
            Metering::Off => 0,
        };
        let result = match outcome {
            Ok(result) => result,
            Err(trap) => Err(self.classify(trap, store.data(), budget)),
        };
        let state = store.data();
        if state.logs_dropped > 0 {
            tracing::warn!(policy = %name, dropped = state.logs_dropped, "policy log lines dropped");
        }
        Metered { result, fuel }
    }

    fn store(&self, policy: &Arc<str>, fuel: u64) -> Store<GuestState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(self.config.memory_limit).unwrap_or(usize::MAX))
            .instances(4)
            .tables(2)
            .memories(1)
            .trap_on_grow_failure(true)
            .build();
        let state = GuestState {
            limits,
            policy: policy.clone(),
            cpu_start: thread_cpu_time(),
            wall_start: Instant::now(),
            budget: self.config.deadline,
            memory_denied: false,
            timed_out: false,
            logs_left: self.config.max_log_lines,
            logs_dropped: 0,
            last_error_log: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        if self.metering == Metering::Fuel {
            // Cannot fail: fuel is enabled on this engine.
            let _ = store.set_fuel(fuel);
        }
        // At every epoch tick, check the CPU time this thread has spent since the call began,
        // and trap once the budget is used. CPU time, not wall time: the guest runs on this
        // thread start to finish, so this is exactly the policy's own running time, and a busy
        // machine that preempts the thread cannot make a healthy policy "time out".
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.used() >= state.budget {
                state.timed_out = true;
                return Err(wasmtime::Error::msg("policy deadline exceeded"));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store
    }

    fn classify(&self, error: wasmtime::Error, state: &GuestState, budget: u64) -> PolicyError {
        if state.timed_out {
            return PolicyError::Timeout {
                limit: self.config.deadline,
            };
        }
        if state.memory_denied {
            return PolicyError::OutOfMemory {
                limit: self.config.memory_limit,
            };
        }
        match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::OutOfFuel) => PolicyError::FuelExhausted { budget },
            Some(trap) => PolicyError::Trap {
                message: match &state.last_error_log {
                    Some(log) => format!("{trap}; the policy logged: {log}"),
                    None => trap.to_string(),
                },
            },
            None => PolicyError::Instantiate(error),
        }
    }
}

/// Refuses components that target another WIT version or import anything beyond the host
/// interface, with an error that names what is wrong.
fn check_world(engine: &Engine, component: &Component) -> Result<(), PolicyError> {
    let ty = component.component_type();
    let wanted = format!("{EVALUATOR}@{WORLD_VERSION}");
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    if !exports.contains(&wanted.as_str()) {
        return Err(match exports.iter().find(|e| e.starts_with(EVALUATOR)) {
            Some(other) => PolicyError::UnsupportedVersion {
                found: other.replace("/evaluator", ""),
                supported: WORLD_VERSION,
            },
            None => PolicyError::NotAPolicy,
        });
    }
    for (name, _) in ty.imports(engine) {
        let allowed = ALLOWED_IMPORTS
            .iter()
            .any(|a| name == format!("{a}@{WORLD_VERSION}"));
        if !allowed {
            return Err(PolicyError::ForbiddenImport(name.to_string()));
        }
    }
    Ok(())
}

impl wasmtime::ResourceLimiter for GuestState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let verdict = self.limits.memory_growing(current, desired, maximum);
        if !matches!(verdict, Ok(true)) {
            self.memory_denied = true;
        }
        verdict
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Longest policy log message kept, bytes.
const MAX_LOG_MESSAGE: usize = 1024;
/// Most structured fields kept per line.
const MAX_LOG_FIELDS: usize = 16;

impl bindings::Host for GuestState {
    fn log(&mut self, level: bindings::LogLevel, message: String, fields: Vec<(String, String)>) {
        let message = clip(message, MAX_LOG_MESSAGE);
        if matches!(level, bindings::LogLevel::Error) {
            self.last_error_log = Some(message.clone());
        }
        if self.logs_left == 0 {
            self.logs_dropped += 1;
            return;
        }
        self.logs_left -= 1;
        let fields: Vec<String> = fields
            .into_iter()
            .take(MAX_LOG_FIELDS)
            .map(|(k, v)| format!("{}={}", clip(k, 64), clip(v, 256)))
            .collect();
        let fields = fields.join(" ");
        let policy = &*self.policy;
        match level {
            bindings::LogLevel::Trace => {
                tracing::trace!(target: "omnirelay::policy::guest", policy, fields, "{message}")
            }
            bindings::LogLevel::Debug => {
                tracing::debug!(target: "omnirelay::policy::guest", policy, fields, "{message}")
            }
            bindings::LogLevel::Info => {
                tracing::info!(target: "omnirelay::policy::guest", policy, fields, "{message}")
            }
            bindings::LogLevel::Warn => {
                tracing::warn!(target: "omnirelay::policy::guest", policy, fields, "{message}")
            }
            bindings::LogLevel::Error => {
                tracing::error!(target: "omnirelay::policy::guest", policy, fields, "{message}")
            }
        }
    }
}

impl bindings::omnirelay::bootstrap_policy::types::Host for GuestState {}

impl GuestState {
    /// Time the call has used: this thread's CPU time since it began, or wall time when the
    /// CPU clock is unavailable. A wall-clock backstop of 20 budgets stops a call whatever the
    /// CPU clock says.
    fn used(&self) -> Duration {
        let wall = self.wall_start.elapsed();
        if wall >= self.budget.saturating_mul(20) {
            return wall;
        }
        match (self.cpu_start, thread_cpu_time()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => wall,
        }
    }
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
