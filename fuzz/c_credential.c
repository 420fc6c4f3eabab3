/* The credential reader of c/examples/common.h (`read_credential`), for the fuzz target
 * `c_credential`: built by build.rs with the system's C compiler. Its messages on stderr
 * are dropped here (libFuzzer reports there). */
#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700
#include <stdio.h>
#include <string.h>

static int quiet_fprintf(FILE *f, const char *fmt, ...) {
    (void)f;
    (void)fmt;
    return 0;
}
#define fprintf quiet_fprintf
#include "../c/examples/common.h"

/* read_credential(path), its result copied out field by field (no struct layout shared
 * with Rust). */
int tally_fuzz_read_credential(const char *path, char id[65], uint8_t key[32], char server[256]) {
    struct credential c;
    memset(&c, 0x5a, sizeof c); /* not zero: a refusal must wipe it */
    int r = read_credential(path, &c);
    memcpy(id, c.id, sizeof c.id);
    memcpy(key, c.key, sizeof c.key);
    memcpy(server, c.server, sizeof c.server);
    return r;
}
