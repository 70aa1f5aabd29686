/*
 * The QEMU side of `cargo xtask bench migrate`: a Multiboot (v1) kernel that
 * runs the same workload as `ramblock migrate --workload increment`, so both
 * migrate a guest that does the same thing.
 *
 * Booted by QEMU's `-kernel` (32-bit protected mode, CPL 0, paging off,
 * EBX = Multiboot information). It
 *   1. enters long mode with an identity map of the first MAP_TOP bytes in
 *      2 MiB pages (QEMU puts RAM above 3 GiB at 4 GiB and up, out of reach
 *      of 32-bit code; ramblock's own guest has all of its RAM below 4 GiB),
 *   2. copies the usable RAM ranges at or above 1 MiB from the Multiboot
 *      memory map into `regions` (page-aligned [start, end) pairs),
 *   3. with IDLE defined: halts with interrupts off, forever;
 *      otherwise: drops to CPL 3 (flat GDT, a TSS, IOPL 3) and loops forever,
 *      incrementing one byte in every 4 KiB page of every region, then
 *      counting the pass in `pass_count` and doing `out` to port 0x11.
 *
 * CPL 3 is entered with SYSEXIT, not IRET: on hosts where KVM runs CPL 0
 * code in its instruction emulator (nested, PVM) a protected-mode IRET or
 * far return to an outer privilege level is not implemented there
 * (KVM_EXIT_INTERNAL_ERROR); SYSEXIT is. SYSEXIT is an Intel instruction in
 * long mode: AMD CPUs executing it natively (not emulated) raise #UD.
 *
 * The image is linked at LOAD (below 1 MiB, so the workload never writes
 * its own code or tables). The bench reads `pass_count` and `regions` at
 * fixed offsets from LOAD through QEMU's monitor; keep them where they are.
 */

        .set LOAD, 0x10000
        .set MAP_TOP, 16 << 30          /* identity-mapped: 16 GiB */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00010002       /* memory map wanted; a.out kludge addresses */
        .set MAX_REGIONS, 32
        .set SYSENTER_CS_MSR, 0x174
        .set EFER_MSR, 0xC0000080
        .set HEARTBEAT_PORT, 0x11

        .text
        .code32
image_start:
multiboot_header:                       /* offset 0 */
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS) & 0xffffffff
        .long multiboot_header          /* header_addr */
        .long image_start               /* load_addr */
        .long 0                         /* load_end_addr: the whole file */
        .long 0                         /* bss_end_addr: no bss */
        .long entry32                   /* entry_addr */

        .org 0x40
pass_count:                             /* offset 0x40: completed passes */
        .quad 0
mbi_pointer:                            /* offset 0x48 */
        .quad 0
regions:                                /* offset 0x50: (start, end) pairs, end 0 terminates */
        .fill (MAX_REGIONS + 1) * 2, 8, 0
regions_full:

entry32:
        cli
        cld
        mov     %ebx, mbi_pointer
        /* The TSS descriptor's base, split across the descriptor (below 16 MiB). */
        mov     $tss, %eax
        mov     %ax, gdt_tss + 2
        shr     $16, %eax
        mov     %al, gdt_tss + 4
        lgdt    gdt_pointer
        /* Long mode: PAE, the page tables, EFER.LME, then paging on. */
        mov     %cr4, %eax
        or      $0x20, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $EFER_MSR, %ecx
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax
        mov     %eax, %cr0
        ljmp    $0x08, $entry64

        .code64
entry64:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        lea     kernel_stack_top(%rip), %rsp
        mov     $0x38, %ax
        ltr     %ax

        /* Usable (type 1) memory-map entries, clipped to [1 MiB, MAP_TOP)
         * and to whole pages, into `regions`. */
        mov     mbi_pointer(%rip), %ebx
        mov     44(%rbx), %ecx          /* mmap_length */
        mov     48(%rbx), %esi          /* mmap_addr */
        add     %rsi, %rcx
        lea     regions(%rip), %rdi
        lea     regions + MAX_REGIONS * 16(%rip), %r10
        mov     $MAP_TOP, %r8
next_entry:
        cmp     %rcx, %rsi
        jae     map_done
        cmpl    $1, 20(%rsi)
        jne     skip_entry
        mov     4(%rsi), %rax           /* base */
        mov     12(%rsi), %rdx          /* length */
        add     %rax, %rdx              /* end */
        cmp     $0x100000, %rax
        jae     1f
        mov     $0x100000, %eax
1:      add     $0xfff, %rax
        and     $-0x1000, %rax
        and     $-0x1000, %rdx
        cmp     %r8, %rdx
        jbe     2f
        mov     %r8, %rdx
2:      cmp     %rdx, %rax
        jae     skip_entry
        cmp     %r10, %rdi
        jae     skip_entry
        mov     %rax, (%rdi)
        mov     %rdx, 8(%rdi)
        add     $16, %rdi
skip_entry:
        mov     (%rsi), %eax            /* the entry's size, not counting itself */
        lea     4(%rsi, %rax), %rsi
        jmp     next_entry
map_done:

.ifdef IDLE
halt:
        hlt
        jmp     halt
.else
        /* CPL 3 with IOPL 3 (SYSEXIT keeps RFLAGS): CS = SYSENTER_CS + 32,
         * SS = SYSENTER_CS + 40, RIP = RDX, RSP = RCX. */
        pushq   $0x3002
        popfq
        mov     $SYSENTER_CS_MSR, %ecx
        mov     $0x08, %eax
        xor     %edx, %edx
        wrmsr
        lea     user(%rip), %rdx
        lea     user_stack_top(%rip), %rcx
        sysexitq

user:                                   /* CPL 3 from here on */
        lea     regions(%rip), %rsi
next_region:
        mov     8(%rsi), %rdx
        test    %rdx, %rdx
        jz      pass_done
        mov     (%rsi), %rbx
next_page:
        incb    (%rbx)
        add     $0x1000, %rbx
        cmp     %rdx, %rbx
        jb      next_page
        add     $16, %rsi
        jmp     next_region
pass_done:
        incq    pass_count(%rip)
        out     %al, $HEARTBEAT_PORT
        jmp     user
.endif

        .balign 8
gdt:
        .quad 0
        .quad 0x00209b0000000000        /* 0x08 kernel code, 64-bit */
        .quad 0x00cf93000000ffff        /* 0x10 kernel data */
        .quad 0x00cffb000000ffff        /* 0x18 user code, 32-bit (unused) */
        .quad 0x00cff3000000ffff        /* 0x20 user data (unused) */
        .quad 0x0020fb0000000000        /* 0x28 user code, 64-bit */
        .quad 0x00cff3000000ffff        /* 0x30 user data */
gdt_tss:
        .quad 0x0000890000000067        /* 0x38 TSS, 64-bit, available; base set at boot */
        .quad 0
gdt_end:
gdt_pointer:
        .word gdt_end - gdt - 1
        .long gdt

        .balign 16
tss:
        .long 0
        .quad kernel_stack_top          /* rsp0 */
        .fill 23, 4, 0
        .word 0
        .word 104                       /* no I/O bitmap: IOPL 3 allows `out` */

        .balign 16
        .fill 512, 1, 0
kernel_stack_top:
        .fill 256, 1, 0
user_stack_top:

        /* Identity map of [0, MAP_TOP): 2 MiB pages, user-accessible. */
        .balign 4096
pml4:
        .quad pdpt + 7
        .fill 511, 8, 0
pdpt:
        .set i, 0
        .rept MAP_TOP >> 30
        .quad pd + i * 4096 + 7
        .set i, i + 1
        .endr
        .fill 512 - (MAP_TOP >> 30), 8, 0
pd:
        .set i, 0
        .rept MAP_TOP >> 21
        .quad (i << 21) | 0x87
        .set i, i + 1
        .endr
