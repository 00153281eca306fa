//! A service as a list of named components, after the way supervisors (systemd units, Erlang
//! supervisors) think of a process: each part is started in order, stopped in the reverse order,
//! and can be asked how it is.
//!
//! A service builds its parts one after the other and pushes each onto its `Components` as soon
//! as it runs (`Components::push`); whatever depends on an earlier part is pushed after it. Then
//! `Components::stop` stops them last-first, awaiting each, and if the service is dropped without
//! `stop` (an error half-way through start, a panic, a test that ends early) `Drop` asks each to
//! stop, last-first, without waiting. Adding a part to a service is one `push`.
//!
//! No runtime is assumed: `Component::stop` returns a boxed future, so async services (core-sink,
//! the appliance daemon, the demo) stop tokio tasks and join threads on blocking tasks in their
//! own implementations. This crate depends on nothing but std; the `tokio` feature adds
//! `TaskComponent`, the part every tokio service has (a background task that only needs aborting).

use std::any::Any;
use std::future::Future;
use std::pin::Pin;

/// What `Component::stop` returns.
pub type StopFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Most components one service holds; a service is a handful of parts, not a collection.
pub const COMPONENTS_MAX: usize = 32;

/// How a component is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Running,
    /// Its thread or task has ended although nobody stopped it.
    Stopped,
}

/// One part of a service: a thread, a task, a listener.
pub trait Component: Any + Send {
    /// A short, stable name (`lander`, `datasets`): logs and health reports use it.
    fn name(&self) -> &'static str;

    fn health(&self) -> Health {
        Health::Running
    }

    /// Asks the component to stop without waiting for it: what happens when the service is
    /// dropped without `stop`. Must not block.
    fn request_stop(&mut self) {}

    /// Stops the component and completes once it has stopped.
    fn stop(self: Box<Self>) -> StopFuture;
}

/// The parts of one service, in start order.
#[derive(Default)]
pub struct Components {
    started: Vec<Box<dyn Component>>,
}

impl Components {
    pub fn new() -> Components {
        Components::default()
    }

    /// Adds a component that has just started; it will stop before every earlier one.
    pub fn push(&mut self, component: impl Component) {
        assert!(self.started.len() < COMPONENTS_MAX, "a service has at most {COMPONENTS_MAX} components");
        let name = component.name();
        assert!(
            self.started.iter().all(|started| started.name() != name),
            "component names are unique within a service: {name}"
        );
        self.started.push(Box::new(component));
    }

    /// The names in start order.
    pub fn names(&self) -> Vec<&'static str> {
        self.started.iter().map(|component| component.name()).collect()
    }

    /// Each component's health, in start order.
    pub fn health(&self) -> Vec<(&'static str, Health)> {
        self.started.iter().map(|component| (component.name(), component.health())).collect()
    }

    /// The component of type `T`, if the service has one.
    pub fn get<T: Component>(&self) -> Option<&T> {
        self.started.iter().find_map(|component| (component.as_ref() as &dyn Any).downcast_ref::<T>())
    }

    /// The component of type `T`, if the service has one.
    pub fn get_mut<T: Component>(&mut self) -> Option<&mut T> {
        self.started.iter_mut().find_map(|component| (component.as_mut() as &mut dyn Any).downcast_mut::<T>())
    }

    /// Stops every component, the last started first, each completely before the next.
    pub async fn stop(&mut self) {
        while let Some(component) = self.started.pop() {
            component.stop().await;
        }
    }
}

impl Drop for Components {
    fn drop(&mut self) {
        for component in self.started.iter_mut().rev() {
            component.request_stop();
        }
    }
}

/// A part that is one value stopping with an async method of its own (an MQTT authority, a
/// device agent): `stop` takes the value and runs `stop_with` on it.
pub struct Stoppable<T: Send + 'static> {
    name: &'static str,
    value: Option<T>,
    stop_with: fn(T) -> StopFuture,
}

impl<T: Send + 'static> Stoppable<T> {
    pub fn new(name: &'static str, value: T, stop_with: fn(T) -> StopFuture) -> Stoppable<T> {
        Stoppable { name, value: Some(value), stop_with }
    }

    /// The value, until the part is stopped.
    pub fn get(&self) -> Option<&T> {
        self.value.as_ref()
    }

    pub fn get_mut(&mut self) -> Option<&mut T> {
        self.value.as_mut()
    }
}

impl<T: Send + 'static> Component for Stoppable<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn stop(mut self: Box<Self>) -> StopFuture {
        match self.value.take() {
            Some(value) => (self.stop_with)(value),
            None => Box::pin(std::future::ready(())),
        }
    }
}

/// A background tokio task that only needs aborting (a metrics server, a reload loop).
#[cfg(feature = "tokio")]
pub struct TaskComponent {
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(feature = "tokio")]
impl TaskComponent {
    pub fn new(name: &'static str, task: tokio::task::JoinHandle<()>) -> TaskComponent {
        TaskComponent { name, task }
    }
}

#[cfg(feature = "tokio")]
impl Component for TaskComponent {
    fn name(&self) -> &'static str {
        self.name
    }

    fn health(&self) -> Health {
        if self.task.is_finished() { Health::Stopped } else { Health::Running }
    }

    fn request_stop(&mut self) {
        self.task.abort();
    }

    fn stop(self: Box<Self>) -> StopFuture {
        self.task.abort();
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    struct Part {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Component for Part {
        fn name(&self) -> &'static str {
            self.name
        }

        fn request_stop(&mut self) {
            self.log.lock().unwrap().push(format!("request_stop {}", self.name));
        }

        fn stop(self: Box<Self>) -> StopFuture {
            Box::pin(async move { self.log.lock().unwrap().push(format!("stop {}", self.name)) })
        }
    }

    /// Polls a future that never waits (the parts here complete at once).
    fn block_on(future: impl Future<Output = ()>) {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        assert!(future.as_mut().poll(&mut context).is_ready());
    }

    fn service(log: &Arc<Mutex<Vec<String>>>) -> Components {
        let mut components = Components::new();
        for name in ["lander", "datasets", "sessions"] {
            components.push(Part { name, log: log.clone() });
        }
        components
    }

    #[test]
    fn components_stop_in_reverse_start_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut components = service(&log);
        assert_eq!(components.names(), ["lander", "datasets", "sessions"]);
        assert_eq!(components.health()[1], ("datasets", Health::Running));
        assert_eq!(components.get::<Part>().map(|part| part.name), Some("lander"));
        assert_eq!(components.get_mut::<Part>().map(|part| part.name), Some("lander"));
        block_on(components.stop());
        drop(components);
        assert_eq!(*log.lock().unwrap(), ["stop sessions", "stop datasets", "stop lander"]);
    }

    #[test]
    fn dropping_without_stop_asks_each_to_stop_in_reverse_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        drop(service(&log));
        assert_eq!(
            *log.lock().unwrap(),
            ["request_stop sessions", "request_stop datasets", "request_stop lander"]
        );
    }
}
