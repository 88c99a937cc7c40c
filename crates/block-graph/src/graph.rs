//! [`Graph`]: the registry of drivers and named nodes, and every graph change
//! (add, remove, attach, detach, replace, filters, reopen, drains, backends).

use crate::backend::{Backend, BackendInner};
use crate::driver::{BlockStatus, Driver, Mapping, ReopenOpts, Role};
use crate::error::{Error, ErrorKind, Result};
use crate::node::{BackendUse, ChildEdge, Node, NodeConfig, NodeRef, ParentEdge};
use crate::options::{validate_node_name, OptionMap, MAX_BACKING_DEPTH};
use crate::perm::{BlockOp, PermPair, Perms};
use parking_lot::{Mutex, ReentrantMutex, RwLock};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::ThreadId;

/// A driver factory: opens a driver from an [`OpenContext`].
pub type DriverFactory = dyn Fn(&mut OpenContext<'_>) -> Result<Box<dyn Driver>> + Send + Sync;

pub(crate) struct GraphInner {
    drivers: RwLock<HashMap<String, Arc<DriverFactory>>>,
    nodes: Mutex<BTreeMap<String, NodeRef>>,
    /// Serialises graph changes (re-entrant: opening a node opens its children).
    pub(crate) lock: ReentrantMutex<()>,
    next_node: AtomicU64,
    next_backend: AtomicU64,
    subscribers: Mutex<Vec<crossbeam_channel::Sender<GraphEvent>>>,
    /// Drain listeners: (id, watched nodes, listener).
    drain_listeners: Mutex<Vec<ListenerEntry>>,
    next_listener: AtomicU64,
}

type ListenerEntry = (u64, Vec<Weak<Node>>, Arc<dyn DrainListener>);

/// Told when a drained section covers nodes it watches (QEMU's
/// `drained_begin`/`drained_poll`/`drained_end` child callbacks, as block
/// jobs use them to pause). Register with [`Graph::add_drain_listener`].
///
/// A section covers a watched node when the node is in the section's closure
/// (the drained nodes, their subtrees and all their ancestors). Each call gets
/// the id of the thread that began the section, so a user can ignore its own
/// sections. Nested sections call the listener once each.
pub trait DrainListener: Send + Sync {
    /// A section begins; called before its nodes are marked drained (so the
    /// user's own in-flight requests can still finish). Must not block.
    fn drained_begin(&self, owner: ThreadId);
    /// Called after every listener's `drained_begin`, still before the nodes
    /// are marked drained: block until the user issues no more requests (a
    /// job parked at a pause point). Must return in bounded time even if the
    /// user cannot get there (the nodes' own drain still holds its requests).
    fn drained_wait(&self, _owner: ThreadId) {}
    /// The section ended; called after its nodes were released.
    fn drained_end(&self, owner: ThreadId);
}

/// Keeps a drain listener registered; dropping it unregisters the listener
/// (a section already begun still gets its `drained_end`).
pub struct DrainListenerGuard {
    graph: Weak<GraphInner>,
    id: u64,
}

impl std::fmt::Debug for DrainListenerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainListenerGuard")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for DrainListenerGuard {
    fn drop(&mut self) {
        if let Some(g) = self.graph.upgrade() {
            g.drain_listeners.lock().retain(|(id, _, _)| *id != self.id);
        }
    }
}

/// The block graph. Cheap to clone (an `Arc` inside), `Send + Sync`.
///
/// Built-in drivers: `file`, `raw`, `null-co`, `memory`, `blkdebug`, `quorum`.
/// Other crates add theirs with [`Graph::register_driver`].
#[derive(Clone)]
pub struct Graph {
    inner: Arc<GraphInner>,
}

impl Default for Graph {
    fn default() -> Self {
        Graph::new()
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("nodes", &self.node_names())
            .finish()
    }
}

/// Something that happened in the graph, for subscribers ([`Graph::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphEvent {
    /// QEMU's `QUORUM_REPORT_BAD`: a quorum child failed a request or returned
    /// data that lost the vote.
    QuorumReportBad {
        /// The quorum node.
        node: String,
        /// The child node.
        child: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// The child's error; None for a data mismatch.
        error: Option<String>,
    },
    /// QEMU's `QUORUM_FAILURE`: not enough children agreed or succeeded.
    QuorumFailure {
        /// The quorum node.
        node: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
    },
    /// A node was removed from the graph.
    NodeRemoved {
        /// Its name.
        node: String,
    },
}

/// How a child option was given.
#[derive(Debug)]
pub enum ChildOption {
    /// The key is absent.
    Absent,
    /// The key is JSON `null` (QEMU: "no backing", e.g. `"backing": null`).
    Null,
    /// The child was opened (or looked up) and will be attached.
    Node(NodeRef),
}

/// Everything a driver factory needs to open a node: its options, its children,
/// and the graph. Children opened here are attached when the node is created.
pub struct OpenContext<'a> {
    graph: &'a Graph,
    opts: OptionMap,
    node_name: String,
    read_only: bool,
    depth: usize,
    children: Vec<(Role, NodeRef)>,
    created: &'a mut Vec<NodeRef>,
}

impl<'a> OpenContext<'a> {
    /// The graph.
    pub fn graph(&self) -> &Graph {
        self.graph
    }

    /// The name the node will have.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The driver name being opened.
    pub fn driver_name(&self) -> &str {
        self.opts.driver()
    }

    /// Whether the node is opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The driver's options: take each one with the typed `take_*` methods.
    /// Whatever is left after the factory returns is refused as unknown.
    pub fn options(&mut self) -> &mut OptionMap {
        &mut self.opts
    }

    /// The children opened so far.
    pub fn children(&self) -> &[(Role, NodeRef)] {
        &self.children
    }

    /// A child opened so far (use it to read headers during open).
    pub fn child(&self, role: &Role) -> Option<NodeRef> {
        self.children
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, n)| n.clone())
    }

    /// Takes option `key` as a child with `role`: a string names an existing
    /// node, an object is a nested definition (created as an implicit node,
    /// inheriting read-only; `backing` definitions default to read-only), `null`
    /// gives [`ChildOption::Null`].
    pub fn take_child(&mut self, key: &str, role: Role) -> Result<ChildOption> {
        match self.opts.take_value(key) {
            None => Ok(ChildOption::Absent),
            Some(Value::Null) => Ok(ChildOption::Null),
            Some(v) => self.open_value(role, &v, key).map(ChildOption::Node),
        }
    }

    /// Like [`OpenContext::take_child`] but absent/null is an error when `required`.
    pub fn open_child(&mut self, key: &str, role: Role, required: bool) -> Result<Option<NodeRef>> {
        match self.take_child(key, role)? {
            ChildOption::Node(n) => Ok(Some(n)),
            _ if required => Err(self.opts.missing(key)),
            _ => Ok(None),
        }
    }

    /// Takes a list option of children (`children` of quorum); they get roles
    /// `children.0`, `children.1`, ...
    pub fn open_child_list(&mut self, key: &str) -> Result<Vec<NodeRef>> {
        let list = self
            .opts
            .take_list(key)?
            .ok_or_else(|| self.opts.missing(key))?;
        let mut out = Vec::new();
        for (i, v) in list.iter().enumerate() {
            out.push(self.open_value(Role::Child(i as u32), v, &format!("{key}.{i}"))?);
        }
        Ok(out)
    }

    /// Opens a nested definition (e.g. a backing file found in an image header:
    /// `{"driver": "qcow2", "file": {"driver": "file", "filename": ...}}`) as
    /// child `role`.
    pub fn open_definition(&mut self, role: Role, def: &Value) -> Result<NodeRef> {
        let key = role.to_string();
        self.open_value(role, def, &key)
    }

    /// Attaches an existing node as child `role`.
    pub fn attach(&mut self, role: Role, node: NodeRef) -> Result<()> {
        if self.children.iter().any(|(r, _)| *r == role) {
            return Err(Error::invalid(format!(
                "driver '{}': child '{role}' given twice",
                self.opts.driver()
            )));
        }
        self.children.push((role, node));
        Ok(())
    }

    fn open_value(&mut self, role: Role, v: &Value, key: &str) -> Result<NodeRef> {
        let node = match v {
            Value::String(name) => self.graph.node(name).map_err(|e| {
                e.context(format!("driver '{}': option '{key}'", self.opts.driver()))
            })?,
            Value::Object(_) => {
                if self.depth + 1 > MAX_BACKING_DEPTH {
                    return Err(Error::invalid(format!(
                        "node definitions (backing chain) nested deeper than {MAX_BACKING_DEPTH}"
                    )));
                }
                let inherit = if role == Role::Backing {
                    true
                } else {
                    self.read_only
                };
                self.graph
                    .open_node(v, Some(inherit), true, self.depth + 1, self.created)?
            }
            other => {
                return Err(Error::invalid(format!(
                "driver '{}': option '{key}' must be a node name or a node definition, got {other}",
                self.opts.driver()
            )))
            }
        };
        self.attach(role, node.clone())?;
        Ok(node)
    }
}

/// Held while a drained section lasts; ends it when dropped. See [`Graph::drain`].
pub struct DrainGuard {
    nodes: Vec<NodeRef>,
    backends: Vec<Arc<BackendInner>>,
    listeners: Vec<Arc<dyn DrainListener>>,
    owner: ThreadId,
}

impl DrainGuard {
    /// The nodes this section drains (the asked nodes, their subtrees and all
    /// their ancestors).
    pub fn nodes(&self) -> &[NodeRef] {
        &self.nodes
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        for b in &self.backends {
            b.drain_end(self.owner);
        }
        for n in &self.nodes {
            n.drain_end(self.owner);
        }
        for l in &self.listeners {
            l.drained_end(self.owner);
        }
    }
}

fn key(n: &Node) -> usize {
    n as *const Node as usize
}

impl Graph {
    /// A graph with the built-in drivers registered.
    pub fn new() -> Graph {
        let g = Graph {
            inner: Arc::new(GraphInner {
                drivers: RwLock::new(HashMap::new()),
                nodes: Mutex::new(BTreeMap::new()),
                lock: ReentrantMutex::new(()),
                next_node: AtomicU64::new(1),
                next_backend: AtomicU64::new(1),
                subscribers: Mutex::new(Vec::new()),
                drain_listeners: Mutex::new(Vec::new()),
                next_listener: AtomicU64::new(1),
            }),
        };
        crate::drivers::register_builtin(&g);
        g
    }

    pub(crate) fn from_inner(inner: Arc<GraphInner>) -> Graph {
        Graph { inner }
    }

    /// Registers (or replaces) a driver factory under `name`.
    pub fn register_driver<F>(&self, name: &str, factory: F)
    where
        F: Fn(&mut OpenContext<'_>) -> Result<Box<dyn Driver>> + Send + Sync + 'static,
    {
        self.inner
            .drivers
            .write()
            .insert(name.to_string(), Arc::new(factory));
    }

    /// Names of the registered drivers, sorted.
    pub fn driver_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.drivers.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Creates a node from options in QEMU's `blockdev-add` shape:
    /// `{"driver": .., "node-name": .., "read-only": bool, "discard": "ignore"|"unmap",
    /// <driver options>, "file": {...} | "name", "backing": {...} | "name" | null}`.
    /// Nested definitions create implicit child nodes. On error nothing is left behind.
    pub fn add_node(&self, options: &Value) -> Result<NodeRef> {
        let _l = self.inner.lock.lock();
        let mut created = Vec::new();
        match self.open_node(options, None, false, 0, &mut created) {
            Ok(n) => Ok(n),
            Err(e) => {
                for n in created.iter().rev() {
                    self.discard_node(n);
                }
                Err(e)
            }
        }
    }

    fn discard_node(&self, n: &NodeRef) {
        let mut nodes = self.inner.nodes.lock();
        if nodes.get(n.name()).is_some_and(|x| Arc::ptr_eq(x, n)) {
            nodes.remove(n.name());
        }
        drop(nodes);
        for e in n.children.write().drain(..) {
            e.node
                .parents
                .lock()
                .retain(|p| !std::ptr::eq(p.parent.as_ptr(), Arc::as_ptr(n)));
        }
        n.mark_removed();
        n.close_once();
    }

    fn open_node(
        &self,
        options: &Value,
        inherit_ro: Option<bool>,
        implicit: bool,
        depth: usize,
        created: &mut Vec<NodeRef>,
    ) -> Result<NodeRef> {
        let mut opts = OptionMap::from_value("blockdev-add", options)?;
        let driver = opts.require_str("driver")?;
        let factory = self
            .inner
            .drivers
            .read()
            .get(&driver)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("unknown driver '{driver}'")))?;
        let mut opts = OptionMap::new(driver.clone(), {
            let mut m = serde_json::Map::new();
            for k in opts.remaining_keys() {
                if let Some(v) = opts.take_value(&k) {
                    m.insert(k, v);
                }
            }
            m
        });
        let name = match opts.take_str("node-name")? {
            Some(n) => {
                validate_node_name(&n)?;
                n
            }
            None => format!(
                "#block{}",
                self.inner.next_node.fetch_add(1, Ordering::Relaxed)
            ),
        };
        if self.inner.nodes.lock().contains_key(&name) {
            return Err(Error::invalid(format!("duplicate node name '{name}'")));
        }
        let read_only = opts.take_bool("read-only")?.or(inherit_ro).unwrap_or(false);
        opts.take_bool("auto-read-only")?;
        let discard = opts.take_enum("discard", &["ignore", "off", "unmap", "on"])?;
        let discard_ignore = matches!(discard.as_deref(), Some("ignore") | Some("off"));

        let mut ctx = OpenContext {
            graph: self,
            opts,
            node_name: name.clone(),
            read_only,
            depth,
            children: Vec::new(),
            created,
        };
        let drv = factory(&mut ctx).map_err(|e| e.or_node(&name))?;
        let OpenContext { opts, children, .. } = ctx;
        opts.finish()?;

        let mut edges = Vec::new();
        for (role, child) in children {
            let perms = drv.child_perms(&role, read_only);
            let user = format!("node '{name}' (as '{role}')");
            check_user(&child, &user, perms, |_| false)?;
            if role == Role::Backing && chain_depth(&child) + 1 > MAX_BACKING_DEPTH {
                return Err(Error::invalid(format!(
                    "backing chain below '{name}' is deeper than {MAX_BACKING_DEPTH}"
                )));
            }
            edges.push(ChildEdge {
                role,
                node: child,
                perms,
            });
        }
        let cfg = NodeConfig {
            name: name.clone(),
            driver_name: driver,
            read_only,
            discard_ignore,
            implicit,
        };
        let node = Arc::new(Node::new(cfg, drv, Arc::downgrade(&self.inner), edges));
        for e in node.children.read().iter() {
            e.node.parents.lock().push(ParentEdge {
                parent: Arc::downgrade(&node),
                parent_name: name.clone(),
                role: e.role.clone(),
                perms: e.perms,
            });
        }
        if let Err(e) = node.refresh_len() {
            self.discard_node(&node);
            return Err(e);
        }
        self.inner.nodes.lock().insert(name, node.clone());
        if implicit {
            created.push(node.clone());
        }
        Ok(node)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<NodeRef> {
        self.inner
            .nodes
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no node named '{name}'")))
    }

    /// Every node, sorted by name.
    pub fn nodes(&self) -> Vec<NodeRef> {
        self.inner.nodes.lock().values().cloned().collect()
    }

    /// Every node name, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.inner.nodes.lock().keys().cloned().collect()
    }

    /// `blockdev-del`: removes a node created with `add_node`. Refused while it has
    /// parents or backends (the error names them), when it is an implicit node, or
    /// when the drive-del operation is blocked. Implicit children left without
    /// users are removed with it.
    ///
    /// Close ordering (as QEMU's `bdrv_close`): the node is drained, taken out
    /// of the name map and marked removed (its own requests fail from then
    /// on); then [`Driver::close`] runs with its children still attached and
    /// *without* the graph lock held, so a close that waits for jobs needing
    /// that lock (the replication filter's) can finish; then the children are
    /// detached. If the caller itself holds the graph lock (the lock is
    /// re-entrant: e.g. a driver removing nodes from inside a graph change),
    /// close runs under it. A node that goes away by its last reference being
    /// dropped is closed wherever that drop happens, children still attached.
    pub fn remove_node(&self, name: &str) -> Result<()> {
        let l = self.inner.lock.lock();
        let node = self.node(name)?;
        if node.is_implicit() {
            return Err(Error::invalid(format!(
                "node '{name}' was created implicitly by its parent; remove the parent instead"
            )));
        }
        let users = users_of(&node);
        if !users.is_empty() {
            let list: Vec<String> = users.into_iter().map(|(d, _, _)| d).collect();
            return Err(Error::new(
                ErrorKind::Busy,
                format!("node is in use by {}", list.join(", ")),
            )
            .with_node(name));
        }
        node.check_op(BlockOp::DriveDel)?;
        drop(l);
        self.remove_recursive(&node);
        Ok(())
    }

    /// Removes `node` (see [`Graph::remove_node`] for the close ordering).
    /// Takes the graph lock itself, and releases it around `Driver::close`.
    fn remove_recursive(&self, node: &NodeRef) {
        {
            let _l = self.inner.lock.lock();
            {
                let _d = self.drain(std::slice::from_ref(node));
                let mut nodes = self.inner.nodes.lock();
                if nodes.get(node.name()).is_some_and(|x| Arc::ptr_eq(x, node)) {
                    nodes.remove(node.name());
                }
            }
            node.mark_removed();
        }
        node.close_once();
        let mut orphans = Vec::new();
        {
            let _l = self.inner.lock.lock();
            let edges: Vec<ChildEdge> = node.children.write().drain(..).collect();
            self.emit(GraphEvent::NodeRemoved {
                node: node.name().to_string(),
            });
            for e in edges {
                e.node
                    .parents
                    .lock()
                    .retain(|p| !std::ptr::eq(p.parent.as_ptr(), Arc::as_ptr(node)));
                if e.node.is_implicit() && users_of(&e.node).is_empty() {
                    orphans.push(e.node);
                }
            }
        }
        // Implicit children left without users go too, each closed outside
        // the lock like their parent.
        for c in orphans {
            self.remove_recursive(&c);
        }
    }

    // ------------------------------------------------------------ drains

    /// Begins a drained section over `nodes`, their subtrees and every ancestor
    /// of those (requests come from parents), plus the backends on all of them:
    /// marks them drained, then waits until no request is in flight in any.
    /// New requests from outside (top-level requests and backends) are held until
    /// the guard drops; requests nested inside admitted ones, and requests from
    /// the draining thread itself, pass. Sections nest.
    ///
    /// Do not call from inside a request on one of these nodes (it would wait
    /// for itself). Graph changes (`attach_child`, `replace_node`, filters,
    /// `reopen`, `remove_node`) drain by themselves; call `drain` yourself to
    /// group several steps (e.g. copy the last data, then `replace_node`) in one
    /// section: sections nest and the draining thread's own requests pass.
    pub fn drain(&self, nodes: &[NodeRef]) -> DrainGuard {
        let owner = std::thread::current().id();
        let (set, backends) = {
            let _l = self.inner.lock.lock();
            drain_closure(nodes)
        };
        let keys: HashSet<usize> = set.iter().map(|n| key(n)).collect();
        let listeners: Vec<Arc<dyn DrainListener>> = self
            .inner
            .drain_listeners
            .lock()
            .iter()
            .filter(|(_, watched, _)| {
                watched
                    .iter()
                    .any(|w| keys.contains(&(Weak::as_ptr(w) as usize)))
            })
            .map(|(_, _, l)| l.clone())
            .collect();
        for l in &listeners {
            l.drained_begin(owner);
        }
        for l in &listeners {
            l.drained_wait(owner);
        }
        for b in &backends {
            b.drain_begin(owner);
        }
        for n in &set {
            n.drain_begin(owner);
        }
        for b in &backends {
            b.drain_wait();
        }
        for n in &set {
            n.drain_wait();
        }
        DrainGuard {
            nodes: set,
            backends,
            listeners,
            owner,
        }
    }

    /// Registers `listener` for drained sections covering any of `nodes`
    /// (see [`DrainListener`]); it stays registered while the guard lives.
    /// The graph holds the nodes weakly: a removed node is simply never drained.
    pub fn add_drain_listener(
        &self,
        nodes: &[NodeRef],
        listener: Arc<dyn DrainListener>,
    ) -> DrainListenerGuard {
        let id = self.inner.next_listener.fetch_add(1, Ordering::Relaxed);
        let watched = nodes.iter().map(Arc::downgrade).collect();
        self.inner
            .drain_listeners
            .lock()
            .push((id, watched, listener));
        DrainListenerGuard {
            graph: Arc::downgrade(&self.inner),
            id,
        }
    }

    // ------------------------------------------------------------ edges

    /// Attaches `child` to `parent` as `role` (replacing a child already in that
    /// role), inside a drained section. Refused when the driver does not accept
    /// the role at run time, when it would make a cycle, when the backing chain
    /// gets too deep, or on a permission conflict.
    pub fn attach_child(&self, parent: &NodeRef, role: Role, child: &NodeRef) -> Result<()> {
        let _l = self.inner.lock.lock();
        live(parent)?;
        live(child)?;
        if !parent.driver().accepts_child(&role) {
            return Err(Error::not_supported(format!(
                "driver '{}' does not accept a '{role}' child at run time",
                parent.driver_name()
            ))
            .with_node(parent.name()));
        }
        if child.reaches(parent) {
            return Err(Error::invalid(format!(
                "attaching '{}' as '{role}' of '{}' would create a cycle",
                child.name(),
                parent.name()
            ))
            .with_node(parent.name()));
        }
        if role == Role::Backing && chain_depth(child) + 1 > MAX_BACKING_DEPTH {
            return Err(Error::invalid(format!(
                "backing chain would be deeper than {MAX_BACKING_DEPTH}"
            ))
            .with_node(parent.name()));
        }
        let perms = parent.driver().child_perms(&role, parent.is_read_only());
        let user = format!("node '{}' (as '{role}')", parent.name());
        let pk = key(parent);
        check_user(child, &user, perms, |u| {
            u.parent == Some(pk) && u.role.as_ref() == Some(&role)
        })?;
        let old = parent.child(&role);
        let mut drain_set = vec![parent.clone(), child.clone()];
        drain_set.extend(old.clone());
        let _d = self.drain(&drain_set);
        if let Some(old) = old {
            remove_edge(parent, &role, &old);
        }
        parent.children.write().push(ChildEdge {
            role: role.clone(),
            node: child.clone(),
            perms,
        });
        child.parents.lock().push(ParentEdge {
            parent: Arc::downgrade(parent),
            parent_name: parent.name().to_string(),
            role,
            perms,
        });
        Ok(())
    }

    /// Detaches the child in `role` from `parent` (drained) and returns it.
    pub fn detach_child(&self, parent: &NodeRef, role: &Role) -> Result<NodeRef> {
        let _l = self.inner.lock.lock();
        let child = parent.child(role).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("no child '{role}'")).with_node(parent.name())
        })?;
        let _d = self.drain(&[parent.clone(), child.clone()]);
        remove_edge(parent, role, &child);
        Ok(child)
    }

    /// `x-blockdev-change` add: asks the parent's driver for a role for `child`
    /// (quorum: the next `children.N`), then attaches it. Returns the role.
    pub fn blockdev_change_add(&self, parent: &NodeRef, child: &NodeRef) -> Result<Role> {
        let _l = self.inner.lock.lock();
        live(parent)?;
        live(child)?;
        if child.reaches(parent) {
            return Err(
                Error::invalid("adding this child would create a cycle").with_node(parent.name())
            );
        }
        let role = parent.driver().prepare_add_child(parent, child)?;
        let perms = parent.driver().child_perms(&role, parent.is_read_only());
        check_user(
            child,
            &format!("node '{}' (as '{role}')", parent.name()),
            perms,
            |_| false,
        )?;
        let _d = self.drain(&[parent.clone(), child.clone()]);
        parent.children.write().push(ChildEdge {
            role: role.clone(),
            node: child.clone(),
            perms,
        });
        child.parents.lock().push(ParentEdge {
            parent: Arc::downgrade(parent),
            parent_name: parent.name().to_string(),
            role: role.clone(),
            perms,
        });
        Ok(role)
    }

    /// `x-blockdev-change` remove: the parent's driver validates (quorum refuses
    /// to drop below its vote threshold), then the child is detached.
    pub fn blockdev_change_del(&self, parent: &NodeRef, role: &Role) -> Result<NodeRef> {
        let _l = self.inner.lock.lock();
        if parent.child(role).is_none() {
            return Err(
                Error::new(ErrorKind::NotFound, format!("no child '{role}'"))
                    .with_node(parent.name()),
            );
        }
        parent.driver().prepare_remove_child(parent, role)?;
        self.detach_child(parent, role)
    }

    /// Makes every parent and backend of `old` point at `new` instead, inside a
    /// drained section. Edges from `new` itself to `old` are kept (that is how a
    /// filter is inserted), and, as QEMU's `should_update_child` does, so is any
    /// edge whose parent `new` reaches (moving it would make a cycle: e.g. the
    /// hidden disk's backing edge when a copy-before-write filter targeting the
    /// hidden disk is inserted above the secondary disk). Refused on permission
    /// conflicts.
    pub fn replace_node(&self, old: &NodeRef, new: &NodeRef) -> Result<()> {
        let _l = self.inner.lock.lock();
        if Arc::ptr_eq(old, new) {
            return Ok(());
        }
        live(new)?;
        let nk = key(new);
        let moved: Vec<(NodeRef, Role, PermPair)> = old
            .parents
            .lock()
            .iter()
            .filter_map(|p| p.parent.upgrade().map(|n| (n, p.role.clone(), p.perms)))
            .filter(|(n, _, _)| key(n) != nk)
            .collect();
        // Like QEMU's should_update_child: an edge whose parent `new` reaches
        // stays where it is (moving it would make a cycle).
        let moved: Vec<(NodeRef, Role, PermPair)> = moved
            .into_iter()
            .filter(|(p, _, _)| !new.reaches(p))
            .collect();
        let moved_edges: Vec<(usize, Role)> =
            moved.iter().map(|(p, r, _)| (key(p), r.clone())).collect();
        let moved_backends: Vec<u64> = old.backends.lock().iter().map(|b| b.id).collect();
        let skip = |u: &UserId| {
            u.backend.is_some_and(|b| moved_backends.contains(&b))
                || u.parent.is_some_and(|pk| {
                    pk == nk
                        || moved_edges
                            .iter()
                            .any(|(k, r)| *k == pk && u.role.as_ref() == Some(r))
                })
        };
        for (p, role, perms) in &moved {
            let eff = effective_perms(p, role, *perms, 0);
            check_user(
                new,
                &format!("node '{}' (as '{role}')", p.name()),
                eff,
                skip,
            )?;
        }
        let backends: Vec<(String, PermPair)> = old
            .backends
            .lock()
            .iter()
            .map(|b| (b.name.clone(), b.perms))
            .collect();
        for (name, perms) in &backends {
            check_user(new, &format!("backend '{name}'"), *perms, skip)?;
        }
        let _d = self.drain(&[old.clone(), new.clone()]);
        for (p, role, perms) in moved {
            for e in p.children.write().iter_mut() {
                if e.role == role && Arc::ptr_eq(&e.node, old) {
                    e.node = new.clone();
                }
            }
            old.parents
                .lock()
                .retain(|x| !(std::ptr::eq(x.parent.as_ptr(), Arc::as_ptr(&p)) && x.role == role));
            new.parents.lock().push(ParentEdge {
                parent: Arc::downgrade(&p),
                parent_name: p.name().to_string(),
                role,
                perms,
            });
        }
        let bs: Vec<BackendUse> = old.backends.lock().drain(..).collect();
        for b in bs {
            if let Some(inner) = b.inner.upgrade() {
                *inner.node.write() = new.clone();
            }
            new.backends.lock().push(b);
        }
        Ok(())
    }

    /// Puts `filter` (a filter node whose filtered child is already `node`, e.g.
    /// created with `add_node({"driver": "copy-before-write", "file": "<node>", ...})`)
    /// above `node`: every parent and backend of `node` now reaches it through the
    /// filter. Done in a drained section; no parent notices.
    pub fn insert_filter_above(&self, node: &NodeRef, filter: &NodeRef) -> Result<()> {
        let _l = self.inner.lock.lock();
        if !filter.is_filter() {
            return Err(Error::invalid(format!(
                "'{}' (driver '{}') is not a filter",
                filter.name(),
                filter.driver_name()
            )));
        }
        match filter.filtered() {
            Some(c) if Arc::ptr_eq(&c, node) => {}
            _ => {
                return Err(Error::invalid(format!(
                    "filter '{}' does not have '{}' as its filtered child",
                    filter.name(),
                    node.name()
                )))
            }
        }
        if filter.len() != node.len() {
            return Err(Error::invalid(format!(
                "filter '{}' has length {} but '{}' has length {}",
                filter.name(),
                filter.len(),
                node.name(),
                node.len()
            )));
        }
        self.replace_node(node, filter)
    }

    /// Takes a filter out of the graph: its parents and backends go back to its
    /// filtered child (drained), then the filter is detached and removed.
    /// The filter is closed as in [`Graph::remove_node`]: before its children
    /// are detached and outside the graph lock.
    pub fn remove_filter(&self, filter: &NodeRef) -> Result<()> {
        {
            let _l = self.inner.lock.lock();
            let child = filter.filtered().ok_or_else(|| {
                Error::invalid(format!(
                    "'{}' is not a filter with a filtered child",
                    filter.name()
                ))
            })?;
            self.replace_node(filter, &child)?;
        }
        self.remove_recursive(filter);
        Ok(())
    }

    // ------------------------------------------------------------ reopen

    /// Reopens a queue of nodes with new read-only flags, all or nothing: checks
    /// every user's permissions against the new flags (a node made read-only while
    /// a writer uses it, a node made writable over a read-only child), then asks
    /// every driver to prepare; on any failure all prepared ones are aborted and
    /// nothing changes. Runs in a drained section over the queue.
    pub fn reopen(&self, queue: &[(NodeRef, ReopenOpts)]) -> Result<()> {
        let _l = self.inner.lock.lock();
        let new_ro: HashMap<usize, bool> =
            queue.iter().map(|(n, o)| (key(n), o.read_only)).collect();
        let ro_of = |n: &Node| {
            new_ro
                .get(&key(n))
                .copied()
                .unwrap_or_else(|| n.is_read_only())
        };
        for (n, o) in queue {
            live(n)?;
            if o.read_only {
                for (desc, u, id) in users_of(n) {
                    let parent_goes_ro = id.parent.is_some_and(|pk| new_ro.get(&pk) == Some(&true));
                    if u.perm.contains(Perms::WRITE) && !parent_goes_ro {
                        return Err(Error::new(
                            ErrorKind::PermissionDenied,
                            format!("cannot make the node read-only: {desc} writes to it"),
                        )
                        .with_node(n.name()));
                    }
                }
            } else {
                for e in n.children.read().iter() {
                    let need = n.driver().child_perms(&e.role, false);
                    if need.perm.contains(Perms::WRITE) && ro_of(&e.node) {
                        return Err(Error::new(
                            ErrorKind::PermissionDenied,
                            format!(
                                "cannot make the node writable: its child '{}' ('{}') is read-only",
                                e.role,
                                e.node.name()
                            ),
                        )
                        .with_node(n.name()));
                    }
                    let user = format!("node '{}' (as '{}')", n.name(), e.role);
                    let nk = key(n);
                    let role = e.role.clone();
                    check_user_ro(&e.node, &ro_of, &user, need, &|u: &UserId| {
                        u.parent == Some(nk) && u.role.as_ref() == Some(&role)
                    })
                    .map_err(|err| err.context("reopen"))?;
                }
            }
        }
        let nodes: Vec<NodeRef> = queue.iter().map(|(n, _)| n.clone()).collect();
        let _d = self.drain(&nodes);
        let mut prepared: Vec<usize> = Vec::new();
        for (i, (n, o)) in queue.iter().enumerate() {
            if let Err(e) = n.driver().reopen_prepare(n, o) {
                for &j in prepared.iter().rev() {
                    let (pn, po) = &queue[j];
                    pn.driver().reopen_abort(pn, po);
                }
                return Err(e.or_node(n.name()).context("reopen"));
            }
            prepared.push(i);
        }
        for (n, o) in queue {
            n.driver().reopen_commit(n, o);
            n.set_read_only(o.read_only);
            let nk = key(n);
            for e in n.children.write().iter_mut() {
                e.perms = n.driver().child_perms(&e.role, o.read_only);
                for p in e.node.parents.lock().iter_mut() {
                    if p.parent.as_ptr() as usize == nk && p.role == e.role {
                        p.perms = e.perms;
                    }
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ queries

    /// The chain below `node`: the node itself, then each backing (or, for
    /// filters, filtered) child in turn.
    pub fn backing_chain(&self, node: &NodeRef) -> Vec<NodeRef> {
        backing_chain(node)
    }

    /// Whether `[offset, offset+len)` is allocated in any layer of the chain from
    /// `top` down to, but excluding, `base` (the whole chain when `base` is None;
    /// filters never count as allocating). Returns the answer and the length of
    /// the run (1..=len) for which it holds.
    pub fn is_allocated_above(
        &self,
        top: &NodeRef,
        base: Option<&NodeRef>,
        offset: u64,
        len: u64,
    ) -> Result<(bool, u64)> {
        is_allocated_above(top, base, offset, len)
    }

    /// What the chain from `top` down to (excluding) `base` reads at `offset`: the
    /// mapping of the first layer that has the run allocated (translated to
    /// [`Mapping::Data`] or [`Mapping::Zero`]), or [`Mapping::Unallocated`] if no
    /// layer has (it reads as zeros), with the run length.
    pub fn block_status_above(
        &self,
        top: &NodeRef,
        base: Option<&NodeRef>,
        offset: u64,
        len: u64,
    ) -> Result<BlockStatus> {
        block_status_above(top, base, offset, len)
    }

    /// True if `node` is `top` or reachable from it (the seed's `check_top_bs`).
    pub fn reaches(&self, top: &NodeRef, node: &NodeRef) -> bool {
        top.reaches(node)
    }

    // ------------------------------------------------------------ backends

    /// Creates a backend (a user's handle, e.g. a guest device or an NBD export)
    /// on `node` with permissions `perms` (see [`PermPair::READ_WRITE`]),
    /// refused on a conflict with the node's other users or when asking for
    /// write on a read-only node.
    pub fn new_backend(&self, node: &NodeRef, perms: PermPair) -> Result<Backend> {
        let id = self.inner.next_backend.fetch_add(1, Ordering::Relaxed);
        self.new_backend_named(&format!("#backend{id}"), node, perms)
    }

    /// Like [`Graph::new_backend`] with a name used in error messages.
    pub fn new_backend_named(
        &self,
        name: &str,
        node: &NodeRef,
        perms: PermPair,
    ) -> Result<Backend> {
        let _l = self.inner.lock.lock();
        live(node)?;
        check_user(node, &format!("backend '{name}'"), perms, |_| false)?;
        let id = self.inner.next_backend.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(BackendInner::new(id, name.to_string(), node.clone(), perms));
        node.backends.lock().push(BackendUse {
            id,
            name: name.to_string(),
            perms,
            inner: Arc::downgrade(&inner),
        });
        Ok(Backend { inner })
    }

    /// True if a backend is attached to `node`.
    pub fn has_backend(&self, node: &NodeRef) -> bool {
        node.has_backend()
    }

    // ------------------------------------------------------------ events

    /// A new receiver of every [`GraphEvent`] emitted from now on (QMP events
    /// such as `QUORUM_REPORT_BAD` are built from these). Dropping the receiver
    /// unsubscribes.
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<GraphEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.inner.subscribers.lock().push(tx);
        rx
    }

    /// Sends `ev` to every subscriber (drivers call this, e.g. through
    /// `node.graph()`).
    pub fn emit(&self, ev: GraphEvent) {
        self.inner
            .subscribers
            .lock()
            .retain(|tx| tx.send(ev.clone()).is_ok());
    }
}

fn live(n: &Node) -> Result<()> {
    if n.is_removed() {
        Err(Error::new(ErrorKind::NotFound, "node has been removed").with_node(n.name()))
    } else {
        Ok(())
    }
}

fn remove_edge(parent: &NodeRef, role: &Role, child: &NodeRef) {
    parent
        .children
        .write()
        .retain(|e| !(e.role == *role && Arc::ptr_eq(&e.node, child)));
    child
        .parents
        .lock()
        .retain(|p| !(std::ptr::eq(p.parent.as_ptr(), Arc::as_ptr(parent)) && p.role == *role));
}

struct UserId {
    parent: Option<usize>,
    role: Option<Role>,
    backend: Option<u64>,
}

/// (description, effective perms, id) of every user of `node`.
fn users_of(node: &Node) -> Vec<(String, PermPair, UserId)> {
    users_of_depth(node, 0)
}

fn users_of_depth(node: &Node, depth: usize) -> Vec<(String, PermPair, UserId)> {
    let parents: Vec<(Weak<Node>, String, Role, PermPair)> = node
        .parents
        .lock()
        .iter()
        .map(|p| {
            (
                p.parent.clone(),
                p.parent_name.clone(),
                p.role.clone(),
                p.perms,
            )
        })
        .collect();
    let mut v = Vec::new();
    for (w, name, role, perms) in parents {
        let Some(pn) = w.upgrade() else { continue };
        let perms = effective_perms(&pn, &role, perms, depth);
        v.push((
            format!("node '{name}' (as '{role}')"),
            perms,
            UserId {
                parent: Some(w.as_ptr() as usize),
                role: Some(role),
                backend: None,
            },
        ));
    }
    for b in node.backends.lock().iter() {
        v.push((
            format!("backend '{}'", b.name),
            b.perms,
            UserId {
                parent: None,
                role: None,
                backend: Some(b.id),
            },
        ));
    }
    v
}

/// What a parent effectively takes on its child `role`: its declared
/// permissions, plus, for a filter's filtered child, whatever the filter's own
/// users take (minus what they do not share): filters pass their users' needs
/// through, as in QEMU.
fn effective_perms(parent: &Node, role: &Role, declared: PermPair, depth: usize) -> PermPair {
    if !parent.is_filter()
        || *role != parent.driver().filtered_child()
        || depth > 4 * MAX_BACKING_DEPTH
    {
        return declared;
    }
    let mut p = declared;
    for (_, u, _) in users_of_depth(parent, depth + 1) {
        p.perm = p.perm | u.perm;
        p.shared = p.shared & u.shared;
    }
    p
}

/// Checks a new user `who` taking `perms` on `node` against the node's state and
/// its other users (except those `skip` selects).
fn check_user(
    node: &Node,
    who: &str,
    perms: PermPair,
    skip: impl Fn(&UserId) -> bool,
) -> Result<()> {
    check_user_ro(node, &|n: &Node| n.is_read_only(), who, perms, &skip)
}

/// [`check_user`] with the nodes' (future) read-only flags given by `ro_of`.
/// Through a filter, the user's permissions are checked on the filtered child too.
fn check_user_ro(
    node: &Node,
    ro_of: &dyn Fn(&Node) -> bool,
    who: &str,
    perms: PermPair,
    skip: &dyn Fn(&UserId) -> bool,
) -> Result<()> {
    if ro_of(node) && perms.perm.contains(Perms::WRITE) {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!("{who} needs write access but the node is read-only"),
        )
        .with_node(node.name()));
    }
    for (desc, u, id) in users_of(node) {
        if skip(&id) {
            continue;
        }
        let a = perms.perm.minus(u.shared);
        if !a.is_empty() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{who} needs '{a}', which conflicts with {desc} that does not share it"),
            )
            .with_node(node.name()));
        }
        let b = u.perm.minus(perms.shared);
        if !b.is_empty() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{who} does not share '{b}', which {desc} holds"),
            )
            .with_node(node.name()));
        }
    }
    if node.is_filter() {
        if let Some(child) = node.filtered() {
            let fk = key(node);
            let role = node.driver().filtered_child();
            let who = format!("{who} (through filter '{}')", node.name());
            check_user_ro(&child, ro_of, &who, perms, &|u: &UserId| {
                skip(u) || (u.parent == Some(fk) && u.role.as_ref() == Some(&role))
            })?;
        }
    }
    Ok(())
}

fn chain_depth(n: &NodeRef) -> usize {
    backing_chain(n).len()
}

fn next_in_chain(n: &Node) -> Option<NodeRef> {
    if n.is_filter() {
        n.filtered()
    } else {
        n.backing()
    }
}

pub(crate) fn backing_chain(node: &NodeRef) -> Vec<NodeRef> {
    let mut v = vec![node.clone()];
    let mut cur = node.clone();
    while let Some(next) = next_in_chain(&cur) {
        if v.len() > 4 * MAX_BACKING_DEPTH {
            break;
        }
        v.push(next.clone());
        cur = next;
    }
    v
}

fn is_base(n: &NodeRef, base: Option<&NodeRef>) -> bool {
    base.is_some_and(|b| Arc::ptr_eq(n, b))
}

pub(crate) fn is_allocated_above(
    top: &NodeRef,
    base: Option<&NodeRef>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    if len == 0 {
        return Err(Error::invalid("is_allocated_above with length 0").with_node(top.name()));
    }
    if offset.checked_add(len).map_or(true, |e| e > top.len()) {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "is_allocated_above at offset {offset} length {len} beyond size {}",
                top.len()
            ),
        )
        .with_node(top.name()));
    }
    let mut n = len;
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        if is_base(&l, base) {
            break;
        }
        if !l.is_filter() && offset < l.len() {
            let st = l.block_status(offset, n)?;
            if st.mapping.is_allocated() {
                return Ok((true, st.len));
            }
            n = n.min(st.len);
        }
        layer = next_in_chain(&l);
    }
    Ok((false, n))
}

pub(crate) fn block_status_above(
    top: &NodeRef,
    base: Option<&NodeRef>,
    offset: u64,
    len: u64,
) -> Result<BlockStatus> {
    let (alloc, run) = is_allocated_above(top, base, offset, len)?;
    if !alloc {
        return Ok(BlockStatus {
            mapping: Mapping::Unallocated,
            len: run,
        });
    }
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        if !l.is_filter() && offset < l.len() {
            let st = l.block_status(offset, run)?;
            match st.mapping {
                Mapping::Unallocated => {}
                Mapping::Zero => {
                    return Ok(BlockStatus {
                        mapping: Mapping::Zero,
                        len: st.len,
                    })
                }
                _ => {
                    return Ok(BlockStatus {
                        mapping: Mapping::Data,
                        len: st.len,
                    })
                }
            }
        }
        layer = next_in_chain(&l);
    }
    Ok(BlockStatus {
        mapping: Mapping::Unallocated,
        len: run,
    })
}

fn drain_closure(nodes: &[NodeRef]) -> (Vec<NodeRef>, Vec<Arc<BackendInner>>) {
    let mut seen: HashSet<usize> = HashSet::new();
    let mut out: Vec<NodeRef> = Vec::new();
    // Subtrees.
    let mut stack: Vec<NodeRef> = nodes.to_vec();
    while let Some(n) = stack.pop() {
        if seen.insert(key(&n)) {
            stack.extend(n.children.read().iter().map(|e| e.node.clone()));
            out.push(n);
        }
    }
    // All ancestors of everything so far.
    let mut stack: Vec<NodeRef> = out.clone();
    while let Some(n) = stack.pop() {
        for p in n.parents.lock().iter().filter_map(|p| p.parent.upgrade()) {
            if seen.insert(key(&p)) {
                out.push(p.clone());
                stack.push(p);
            }
        }
    }
    let mut backends = Vec::new();
    for n in &out {
        backends.extend(n.backends.lock().iter().filter_map(|b| b.inner.upgrade()));
    }
    (out, backends)
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn ok<T: Send + Sync>() {}
    ok::<Graph>();
    ok::<Node>();
    ok::<Backend>();
    ok::<Weak<GraphInner>>();
}
