//! Unit tests: the server's tests of its former domxml module, tables of
//! refused and accepted documents (real `virsh dumpxml` output among them),
//! the rewrite, and the fuzzing checks over the committed seeds.

mod accepted;
mod refused;
mod rewrite;
mod seeds;
