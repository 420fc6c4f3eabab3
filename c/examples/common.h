/* What the two examples share: time, randomness, a TCP connection, the credential
 * file (spec/PROTOCOL.md section 9.2), and the loop that moves bytes between the
 * socket and a Tally engine. POSIX only; a firmware port replaces these with its own
 * clock, RNG and socket calls (lwIP, Zephyr). */
#ifndef TALLY_EXAMPLE_COMMON_H
#define TALLY_EXAMPLE_COMMON_H

#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Milliseconds on a monotonic clock: the engine's only notion of time. */
static inline uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* 32 bytes from the system's CSPRNG: nonces and ephemeral keys. */
static inline int random_bytes(uint8_t out[32]) {
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0) return -1;
    size_t got = 0;
    while (got < 32) {
        ssize_t n = read(fd, out + got, 32 - got);
        if (n <= 0) { close(fd); return -1; }
        got += (size_t)n;
    }
    close(fd);
    return 0;
}

/* Connects to "host:port" (the last ':' splits; IPv6 as [::1]:7420). */
static inline int dial(const char *server) {
    char host[256];
    const char *colon = strrchr(server, ':');
    if (!colon || (size_t)(colon - server) >= sizeof host) return -1;
    size_t hl = (size_t)(colon - server);
    memcpy(host, server, hl);
    host[hl] = '\0';
    char *h = host;
    if (h[0] == '[' && hl > 1 && h[hl - 1] == ']') { h[hl - 1] = '\0'; h++; }
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(h, colon + 1, &hints, &res) != 0) return -1;
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

static inline int send_all(int fd, const uint8_t *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Overwrites a secret so that the compiler cannot skip it (explicit_bzero is not C11). */
static inline void wipe(void *p, size_t n) {
    volatile unsigned char *v = (volatile unsigned char *)p;
    while (n--) *v++ = 0;
}

/* The device's credential: id, key, server, and the server's static public key S (the
 * encrypted mode seals the id to it; spec 9.2 `server-key`). */
struct credential {
    char id[65];
    uint8_t key[32];
    char server[256];
    uint8_t server_key[32];
};

static inline int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* 64 hex digits (either case) to 32 bytes: 0, or -1 (then `out` may be half written). */
static inline int hex32(const char *hex, uint8_t out[32]) {
    if (strlen(hex) != 64) return -1;
    for (int i = 0; i < 32; i++) {
        int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

/* The value of `name = "value"` on `line`, copied to out (at most cap - 1 bytes). */
static inline int string_field(const char *line, const char *name, char *out, size_t cap) {
    size_t nl = strlen(name);
    if (strncmp(line, name, nl) != 0) return 0;
    const char *p = line + nl;
    while (*p == ' ') p++;
    if (*p++ != '=') return 0;
    while (*p == ' ') p++;
    if (*p++ != '"') return -1;
    const char *end = strchr(p, '"');
    if (!end || (size_t)(end - p) >= cap) return -1;
    memcpy(out, p, (size_t)(end - p));
    out[end - p] = '\0';
    return 1;
}

/* Whether `line` is `tally-credential = 1` (the whole value: not 10, not 1x). */
static inline int version_one(const char *line) {
    const char *p = line;
    if (strncmp(p, "tally-credential", 16) != 0) return 0;
    p += 16;
    while (*p == ' ') p++;
    if (*p++ != '=') return 0;
    while (*p == ' ') p++;
    if (*p++ != '1') return 0;
    while (*p == ' ' || *p == '\r') p++;
    return *p == '\n' || *p == '\0' || *p == '#';
}

/* Reads the file `tally enroll` (or examples/enroll.c) writes (spec 9.2: unknown keys
 * are ignored). Returns 0, or -1 with a message on stderr. Every buffer that held the
 * key is wiped; the file is read unbuffered, so that stdio keeps no copy. */
static inline int read_credential(const char *path, struct credential *cred) {
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "%s: %s\n", path, strerror(errno)); return -1; }
    /* Its key lets anyone act as the device: refused if every user may read or write it,
     * as the tally CLI (and ssh, for a private key) refuses it. */
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || (st.st_mode & 0006)) {
        fprintf(stderr, "%s is accessible to every user of this machine (mode %04o), and its "
                        "key lets anyone act as the device: `chmod 600 %s`, then try again\n",
                path, (unsigned)(st.st_mode & 07777), path);
        fclose(f);
        return -1;
    }
    setvbuf(f, NULL, _IONBF, 0);
    char line[512], key_hex[65] = "", server_key_hex[65] = "";
    int version = -1, bad = 0, r;
    memset(cred, 0, sizeof *cred);
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        if (strncmp(line, "tally-credential", 16) == 0) { version = version_one(line); continue; }
        if ((r = string_field(line, "id", cred->id, sizeof cred->id)) ||
            (r = string_field(line, "key", key_hex, sizeof key_hex)) ||
            (r = string_field(line, "server", cred->server, sizeof cred->server)) ||
            (r = string_field(line, "server-key", server_key_hex, sizeof server_key_hex))) {
            if (r < 0) { bad = 1; break; }
        }
    }
    wipe(line, sizeof line);
    fclose(f);
    /* Spec 9.2: all five entries required; hex digits in either case. */
    int ok = !bad && version == 1 && cred->id[0] && cred->server[0] &&
             hex32(key_hex, cred->key) == 0 && hex32(server_key_hex, cred->server_key) == 0;
    wipe(key_hex, sizeof key_hex);
    if (!ok) {
        wipe(cred, sizeof *cred);
        fprintf(stderr, "%s: not a Tally credential (spec 9.2: tally-credential = 1, id, key, server, server-key)\n", path);
        return -1;
    }
    return 0;
}

#endif
