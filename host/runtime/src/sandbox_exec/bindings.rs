//! The generated side of `sandbox-exec`: only this capability sees these
//! types. The builder world's own bindgen maps its `sandbox-exec` and
//! `types` imports here (`with:`), as wasmtime-wasi-http's worlds map
//! `wasi:io` to wasmtime-wasi's.

wasmtime::component::bindgen!({
    path: "../../wit",
    interfaces: "import snapsign:components/sandbox-exec@0.1.0;",
    imports: { default: async },
    with: { "snapsign:components/sandbox-exec.file-writer": super::backend::FileSink },
});
