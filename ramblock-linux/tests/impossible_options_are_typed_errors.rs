//! Every impossible mix of builder options is a typed `OptionsError`
//! before any system call, and its message says what to do.

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::FlagsError;
use ramblock_linux::{Error, MemoryBuilder, NumaBinding, NumaPolicy, OptionsError};
use std::ptr::NonNull;

const MIB: u64 = 1 << 20;

fn options_error(builder: MemoryBuilder) -> OptionsError {
    match builder.build() {
        Err(Error::Options(e)) => {
            assert!(!e.to_string().is_empty());
            e
        }
        other => panic!("expected an options error, got {other:?}"),
    }
}

#[test]
fn each_impossible_mix_has_its_error() {
    let anon = || MemoryBuilder::anonymous(ByteLen(2 * MIB));
    assert_eq!(
        options_error(MemoryBuilder::anonymous(ByteLen(0))),
        OptionsError::ZeroLength
    );
    assert!(matches!(
        options_error(anon().max_length(ByteLen(MIB))),
        OptionsError::UsedExceedsMax { .. }
    ));
    assert!(matches!(
        options_error(MemoryBuilder::anonymous(ByteLen(4097))),
        OptionsError::Unaligned {
            what: "used length",
            ..
        }
    ));
    assert!(matches!(
        options_error(MemoryBuilder::hugetlb(ByteLen(3 * MIB), PageSize::SIZE_2M)),
        OptionsError::Unaligned { .. }
    ));
    assert_eq!(
        options_error(
            anon()
                .huge_pages(PageSize::SIZE_2M)
                .transparent_hugepages(true)
        ),
        OptionsError::ThpWithHugetlb
    );
    assert!(matches!(
        options_error(anon().huge_pages(PageSize::new(64 << 10).unwrap())),
        OptionsError::UnsupportedHugePageSize { .. }
    ));
    assert!(matches!(
        options_error(anon().read_only(true)),
        OptionsError::ReadOnlyWithoutFile {
            backing: "anonymous"
        }
    ));
    assert!(matches!(
        options_error(MemoryBuilder::file("/tmp", ByteLen(2 * MIB)).transparent_hugepages(true)),
        OptionsError::ThpUnsupported { backing: "file" }
    ));
    assert!(matches!(
        options_error(MemoryBuilder::file("/tmp", ByteLen(2 * MIB)).huge_pages(PageSize::SIZE_2M)),
        OptionsError::HugePageSizeNotApplicable { .. }
    ));
    assert_eq!(
        options_error(
            MemoryBuilder::file("/tmp/x", ByteLen(2 * MIB))
                .shared(true)
                .read_only_fd(true)
        ),
        OptionsError::Flags(FlagsError::ReadOnlyFdWritableShared)
    );
    assert_eq!(
        options_error(anon().prealloc_threads(0)),
        OptionsError::ZeroThreads
    );
    assert_eq!(
        options_error(anon().numa(NumaBinding {
            nodes: vec![],
            policy: NumaPolicy::Bind
        })),
        OptionsError::NoNumaNodes
    );
}

#[test]
fn caller_memory_refuses_what_would_remap_it() {
    let mut buf = vec![0u8; 3 * 4096];
    let at = buf.as_mut_ptr() as usize;
    let aligned = NonNull::new(((at + 4095) & !4095) as *mut u8).unwrap();
    let caller = |ptr| {
        // SAFETY: these builders are only validated, never built into memory
        // that outlives `buf`.
        unsafe { MemoryBuilder::caller(ptr, ByteLen(4096), PageSize::SIZE_4K) }
    };
    assert!(matches!(
        options_error(caller(aligned).max_length(ByteLen(8192))),
        OptionsError::CallerOption {
            option: "max_length"
        }
    ));
    assert!(matches!(
        options_error(caller(aligned).no_reserve(true)),
        OptionsError::CallerOption {
            option: "no_reserve"
        }
    ));
    assert!(matches!(
        options_error(caller(aligned).huge_pages(PageSize::SIZE_2M)),
        OptionsError::HugePageSizeNotApplicable { .. }
    ));
    let odd = NonNull::new((aligned.as_ptr() as usize + 8) as *mut u8).unwrap();
    assert!(matches!(
        options_error(caller(odd)),
        OptionsError::CallerUnaligned { .. }
    ));
    drop(buf);
}

#[test]
fn host_failures_keep_the_errno_and_say_what_to_do() {
    let err = MemoryBuilder::file("/nonexistent-dir/ram", ByteLen(2 * MIB))
        .build()
        .unwrap_err();
    assert_eq!(err.errno(), Some(rustix::io::Errno::NOENT), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("/nonexistent-dir/ram") && text.contains("errno 2"),
        "{text}"
    );

    let dir = std::env::temp_dir().join(format!("ramblock-ro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let err = MemoryBuilder::file(&path, ByteLen(2 * MIB))
        .read_only_fd(true)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::FileTooSmall { size: 4096, .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
