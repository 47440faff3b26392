/* A function inside DEPTH nested namespaces, with DWARF written by hand (gcc refuses to
 * nest more than 255 namespaces): `long deep(struct node *n) { return (long)n->next; }`,
 * `n` in rdi, `next` at offset 0x100. With -DINLINED=M, `deep` also holds a chain of M
 * nested DW_TAG_inlined_subroutine entries. Build: gcc -DDEPTH=N nested_main.c nested.S */
	.text
	.globl	deep
	.type	deep, @function
deep:
.Ldeep_start:
	movq	0x100(%rdi), %rax
	ret
.Ldeep_end:
	.size	deep, .-deep

	.section	.debug_abbrev,"",@progbits
.Labbrev:
	.uleb128 1
	.uleb128 0x11
	.byte 1
	.uleb128 0x3
	.uleb128 0x8
	.uleb128 0x11
	.uleb128 0x1
	.uleb128 0x12
	.uleb128 0x7
	.byte 0
	.byte 0
	.uleb128 2
	.uleb128 0x39
	.byte 1
	.byte 0
	.byte 0
	.uleb128 3
	.uleb128 0x2e
	.byte 1
	.uleb128 0x3
	.uleb128 0x8
	.uleb128 0x11
	.uleb128 0x1
	.uleb128 0x12
	.uleb128 0x7
	.byte 0
	.byte 0
	.uleb128 4
	.uleb128 0x5
	.byte 0
	.uleb128 0x3
	.uleb128 0x8
	.uleb128 0x49
	.uleb128 0x13
	.uleb128 0x2
	.uleb128 0x18
	.byte 0
	.byte 0
	.uleb128 5
	.uleb128 0xf
	.byte 0
	.uleb128 0xb
	.uleb128 0xb
	.uleb128 0x49
	.uleb128 0x13
	.byte 0
	.byte 0
	.uleb128 6
	.uleb128 0x13
	.byte 1
	.uleb128 0x3
	.uleb128 0x8
	.uleb128 0xb
	.uleb128 0x5
	.byte 0
	.byte 0
	.uleb128 7
	.uleb128 0xd
	.byte 0
	.uleb128 0x3
	.uleb128 0x8
	.uleb128 0x49
	.uleb128 0x13
	.uleb128 0x38
	.uleb128 0x5
	.byte 0
	.byte 0
	.uleb128 9
	.uleb128 0x1d
	.byte 1
	.byte 0
	.byte 0
	.uleb128 8
	.uleb128 0x24
	.byte 0
	.uleb128 0x3
	.uleb128 0x8
	.uleb128 0xb
	.uleb128 0xb
	.uleb128 0x3e
	.uleb128 0xb
	.byte 0
	.byte 0
	.byte 0

	.section	.debug_info,"",@progbits
.Lcu:
	.long .Lcu_end - .Lcu_version
.Lcu_version:
	.value 4
	.long .Labbrev
	.byte 8
	.uleb128 1
	.string "nested.S"
	.quad .Ldeep_start
	.quad .Ldeep_end - .Ldeep_start
.Lnode:
	.uleb128 6
	.string "node"
	.value 0x108
	.uleb128 7
	.string "pad"
	.long .Llong - .Lcu
	.value 0
	.uleb128 7
	.string "next"
	.long .Lptr - .Lcu
	.value 0x100
	.byte 0
.Lptr:
	.uleb128 5
	.byte 8
	.long .Lnode - .Lcu
.Llong:
	.uleb128 8
	.string "long"
	.byte 8
	.byte 5
	.rept DEPTH
	.uleb128 2
	.endr
	.uleb128 3
	.string "deep"
	.quad .Ldeep_start
	.quad .Ldeep_end - .Ldeep_start
#ifdef INLINED
	.rept INLINED
	.uleb128 9
	.endr
	.rept INLINED
	.byte 0
	.endr
#endif
	.uleb128 4
	.string "n"
	.long .Lptr - .Lcu
	.uleb128 1
	.byte 0x55
	.byte 0
	.rept DEPTH
	.byte 0
	.endr
	.byte 0
.Lcu_end:
	.section	.note.GNU-stack,"",@progbits
