//! What `policy build` (and so `test` and `publish` of a bundle source) checks of every module
//! it builds: that it was linked with policy-sdk's guest settings, a 64 KiB shadow stack and
//! 256 KiB of heap inside the initial memory, which spare every decision a memory grow (half
//! its cost; `bench/README.md`). The SDK's build script passes them to the linker; this check
//! notices when they did not arrive, whatever the reason.

use anyhow::{Context, bail};
use wasmparser::{Encoding, Operator, Parser, Payload, ValType};

/// The shadow stack policy-sdk links, bytes.
const STACK: u64 = 64 * 1024;
/// The heap policy-sdk reserves in the initial memory, bytes.
const HEAP: u64 = 256 * 1024;

/// The memory layout of the core module that owns a policy component's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// The initial shadow-stack pointer: the stack's size (rustc puts the stack first).
    pub stack: u64,
    /// The memory's initial size, bytes.
    pub initial_memory: u64,
}

#[derive(Default)]
struct Frame {
    memory: Option<u64>,
    stack: Option<u64>,
}

/// Reads the layout of `component`'s (or a core module's) memory-owning module.
pub(super) fn read(component: &[u8]) -> anyhow::Result<Layout> {
    let mut frames: Vec<Frame> = Vec::new();
    let mut found = None;
    for payload in Parser::new(0).parse_all(component) {
        match payload.context("not a WebAssembly component")? {
            Payload::Version {
                encoding: Encoding::Module,
                ..
            } => frames.push(Frame::default()),
            Payload::MemorySection(reader) => {
                if let (Some(frame), Some(memory)) = (frames.last_mut(), reader.into_iter().next())
                {
                    let memory = memory?;
                    frame.memory = Some(memory.initial << memory.page_size_log2.unwrap_or(16));
                }
            }
            Payload::GlobalSection(reader) => {
                let Some(frame) = frames.last_mut() else {
                    continue;
                };
                for global in reader {
                    let global = global?;
                    if frame.stack.is_none()
                        && global.ty.mutable
                        && global.ty.content_type == ValType::I32
                        && let Ok(Operator::I32Const { value }) =
                            global.init_expr.get_operators_reader().read()
                    {
                        frame.stack = Some(u64::from(value.cast_unsigned()));
                    }
                }
            }
            Payload::End(_) => {
                if let Some(Frame {
                    memory: Some(memory),
                    stack: Some(stack),
                }) = frames.pop()
                {
                    found.get_or_insert(Layout {
                        stack,
                        initial_memory: memory,
                    });
                }
            }
            _ => {}
        }
    }
    found.context("no module with a memory and a stack pointer in it")
}

/// Refuses a layout without policy-sdk's settings.
pub(super) fn check(policy: &str, layout: Layout) -> anyhow::Result<()> {
    if layout.stack > STACK || layout.initial_memory < layout.stack + HEAP {
        bail!(
            "policy {policy} was linked without policy-sdk's guest settings: a {} byte shadow \
             stack and {} bytes of initial memory, where policy-sdk links a {STACK} byte stack \
             and {HEAP} bytes of heap after it, so every decision would grow memory. Depend on \
             policy-sdk directly from the policy crate (its build script passes the settings \
             to the crate's cdylib)",
            layout.stack,
            layout.initial_memory
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_policies_have_the_sdk_layout() {
        for module in [
            crate::policy::examples::CLUSTER_ROLE,
            crate::policy::examples::POSTURE,
        ] {
            let layout = read(module).unwrap();
            assert_eq!(layout.stack, STACK);
            assert!(layout.initial_memory >= STACK + HEAP, "{layout:?}");
            check("example", layout).unwrap();
        }
    }

    #[test]
    fn rustcs_default_layout_is_refused() {
        // What rustc links without the SDK's settings: a 1 MiB stack, data, no heap.
        let layout = Layout {
            stack: 1 << 20,
            initial_memory: 17 * 65536,
        };
        let error = check("p", layout).unwrap_err().to_string();
        assert!(error.contains("1048576 byte shadow stack"), "{error}");
        assert!(
            check(
                "p",
                Layout {
                    stack: STACK,
                    initial_memory: 2 * 65536
                }
            )
            .is_err()
        );
        assert!(read(b"not wasm").is_err());
    }
}
