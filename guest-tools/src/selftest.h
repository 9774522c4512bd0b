/* SPDX-License-Identifier: MIT */
/*
 * selftest.h - `uffd-snapshot --self-test`: checks of what needs no kernel
 * support; one {"type":"self-test",...} line, exit 0 or 3.
 */
#ifndef UFFDLAB_SELFTEST_H
#define UFFDLAB_SELFTEST_H

int self_test(void);

#endif
