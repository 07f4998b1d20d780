//! Field offsets of kernel structures, read from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//! The kernel programs follow `struct sock` pointers only through these, so they stay right on any kernel.

use std::path::Path;

use agent_common::KernelOffsets;
use btf_rs::{Btf, Type};

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("cannot read BTF from {path}: {source} (does this kernel have CONFIG_DEBUG_INFO_BTF?)")]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF: struct `{strukt}` has no member path `{path}`")]
    NoMember { strukt: String, path: String },
    #[error("kernel BTF lookup failed: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// Default location of the kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads every offset the kernel programs need.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(path).map_err(|source| OffsetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let off = |s: &str, p: &str| member_offset(&btf, s, p);
    Ok(KernelOffsets {
        sock_net: off("sock", "__sk_common.skc_net.net")?,
        net_inum: off("net", "ns.inum")?,
        sock_cgroup: off("sock", "sk_cgrp_data.cgroup")?,
        cgroup_kn: off("cgroup", "kn")?,
        kernfs_id: off("kernfs_node", "id")?,
        skb_gso_segs: off("sk_buff", "cb")? + off("tcp_skb_cb", "tcp_gso_segs")?,
        tcp_total_retrans: off("tcp_sock", "total_retrans")?,
        sock_family: off("sock", "__sk_common.skc_family")?,
        sock_protocol: off("sock", "sk_protocol")?,
        sock_dport: off("sock", "__sk_common.skc_dport")?,
        sock_daddr: off("sock", "__sk_common.skc_daddr")?,
        sock_v6_saddr: off("sock", "__sk_common.skc_v6_rcv_saddr")?,
        sock_v6_daddr: off("sock", "__sk_common.skc_v6_daddr")?,
        inet_sport: off("inet_sock", "inet_sport")?,
        inet_saddr: off("inet_sock", "inet_saddr")?,
        _pad: 0,
    })
}

/// Byte offset of `path` (dot-separated members; anonymous structs and unions are searched through)
/// inside `struct strukt`.
pub fn member_offset(btf: &Btf, strukt: &str, path: &str) -> Result<u32, OffsetError> {
    let root = btf
        .resolve_types_by_name(strukt)?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| OffsetError::NoStruct(strukt.to_string()))?;
    let mut ty = root;
    let mut bits = 0u32;
    for name in path.split('.') {
        let (off, member_ty) =
            find_member(btf, &ty, name)?.ok_or_else(|| OffsetError::NoMember {
                strukt: strukt.to_string(),
                path: path.to_string(),
            })?;
        bits += off;
        ty = member_ty;
    }
    Ok(bits / 8)
}

/// Finds `name` among the members of a struct or union type, descending into anonymous members.
/// Returns the member's bit offset and its type with typedefs and qualifiers stripped.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>, OffsetError> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let m_name = btf.resolve_name(m).unwrap_or_default();
        let m_ty = strip(btf, btf.resolve_chained_type(m)?)?;
        if m_name == name {
            return Ok(Some((m.bit_offset(), m_ty)));
        }
        if m_name.is_empty()
            && let Some((inner, t)) = find_member(btf, &m_ty, name)?
        {
            return Ok(Some((m.bit_offset() + inner, t)));
        }
    }
    Ok(None)
}

/// Names of the arguments' types of raw tracepoint `name`, from the kernel's `btf_trace_<name>`
/// typedef (a pointer to `void (*)(void *, args...)`), the context pointer left out. Pointers are
/// written `*name`, so `tcp_retransmit_skb` gives `["*sock", "*sk_buff", "int"]`.
pub fn raw_tracepoint_args(path: &Path, name: &str) -> Result<Vec<String>, OffsetError> {
    let btf = Btf::from_file(path).map_err(|source| OffsetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let typedef = format!("btf_trace_{name}");
    let proto = btf
        .resolve_types_by_name(&typedef)?
        .into_iter()
        .find_map(|t| match t {
            Type::Typedef(td) => Some(td),
            _ => None,
        })
        .ok_or_else(|| OffsetError::NoStruct(typedef.clone()))?;
    let Type::Ptr(ptr) = btf.resolve_chained_type(&proto)? else {
        return Err(OffsetError::NoStruct(typedef));
    };
    let Type::FuncProto(fp) = btf.resolve_chained_type(&ptr)? else {
        return Err(OffsetError::NoStruct(typedef));
    };
    let mut names = Vec::new();
    for param in fp.parameters.iter().skip(1) {
        let ty = strip(&btf, btf.resolve_chained_type(param)?)?;
        names.push(match &ty {
            Type::Ptr(p) => {
                let inner = strip(&btf, btf.resolve_chained_type(p)?)?;
                format!(
                    "*{}",
                    inner
                        .as_btf_type()
                        .and_then(|t| btf.resolve_name(t).ok())
                        .unwrap_or_default()
                )
            }
            other => other
                .as_btf_type()
                .and_then(|t| btf.resolve_name(t).ok())
                .unwrap_or_default(),
        });
    }
    Ok(names)
}

fn strip(btf: &Btf, mut ty: Type) -> Result<Type, OffsetError> {
    loop {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(t)?
            }
            Type::TypeTag(t) => btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checked against the running kernel; layouts that have been stable for years on x86-64.
    #[test]
    fn offsets_from_running_kernel() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skip: {VMLINUX_BTF} absent");
            return;
        }
        let o = kernel_offsets(path).unwrap();
        // `__sk_common` is the first member of `struct sock`; `skc_net` lies inside it.
        assert!(o.sock_net > 0 && o.sock_net < 136, "{o:?}");
        // `cb` of sk_buff has been at 40 on 64-bit kernels since 2015; tcp_gso_segs right after seq, end_seq.
        assert_eq!(o.skb_gso_segs, 40 + 8, "{o:?}");
        assert!(o.kernfs_id > 0 && o.cgroup_kn > 0, "{o:?}");
        // `tcp_sock` starts with `inet_connection_sock`, which starts with `struct sock`.
        assert!(o.tcp_total_retrans > o.sock_cgroup, "{o:?}");
        // `struct sock_common` opens with the address pair, then the port pair (dport first).
        assert_eq!((o.sock_daddr, o.sock_dport), (0, 12), "{o:?}");
        assert!(o.sock_family > o.sock_dport && o.sock_family < 24, "{o:?}");
        assert!(
            o.sock_v6_daddr > o.sock_family && o.sock_v6_saddr == o.sock_v6_daddr + 16,
            "{o:?}"
        );
        assert!(o.sock_protocol > o.sock_v6_saddr, "{o:?}");
        // `inet_sock` starts with `struct sock`.
        assert!(
            o.inet_saddr > o.sock_protocol && o.inet_sport > o.inet_saddr,
            "{o:?}"
        );
    }

    /// The raw tracepoint programs read their arguments by position: check them against the kernel.
    #[test]
    fn raw_tracepoint_arguments_match() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skip: {VMLINUX_BTF} absent");
            return;
        }
        let args = |name| raw_tracepoint_args(path, name).unwrap();
        assert_eq!(args("tcp_retransmit_skb"), ["*sock", "*sk_buff", "int"]);
        assert_eq!(args("inet_sock_set_state"), ["*sock", "int", "int"]);
        assert_eq!(args("sock_send_length"), ["*sock", "int", "int"]);
    }

    #[test]
    fn missing_member_is_an_error() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let err = member_offset(&btf, "sock", "no_such_member").unwrap_err();
        assert!(err.to_string().contains("no_such_member"), "{err}");
    }
}
