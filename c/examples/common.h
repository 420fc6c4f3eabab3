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

static inline const char *skip_blanks(const char *p) {
    while (*p == ' ' || *p == '\t') p++;
    return p;
}

/* After the name `name` at the start of `line` and the '=' that follows it: the value;
 * NULL if the line sets another entry (`id2 = ...` is not `id`). */
static inline const char *value_of(const char *line, const char *name) {
    size_t nl = strlen(name);
    if (strncmp(line, name, nl) != 0) return NULL;
    const char *p = skip_blanks(line + nl);
    return *p == '=' ? skip_blanks(p + 1) : NULL;
}

/* Whether only blanks and a comment follow a value. */
static inline int value_ends(const char *p) {
    p = skip_blanks(p);
    return *p == '\0' || *p == '#';
}

/* The value of `name = "value"` on `line`, copied to out (at most cap - 1 bytes): 1, or
 * 0 if the line sets another entry, or -1 if the value is not a basic string without
 * escapes and control characters (spec 9.2: ids and addresses need none; this reader
 * refuses what it would misread). */
static inline int string_field(const char *line, const char *name, char *out, size_t cap) {
    const char *p = value_of(line, name);
    if (!p) return 0;
    if (*p++ != '"') return -1;
    const char *end = strchr(p, '"');
    if (!end || (size_t)(end - p) >= cap || !value_ends(end + 1)) return -1;
    for (const char *q = p; q < end; q++)
        if (*q == '\\' || *q == 0x7f || ((unsigned char)*q < 0x20 && *q != '\t')) return -1;
    memcpy(out, p, (size_t)(end - p));
    out[end - p] = '\0';
    return 1;
}

/* Whether `line` is `tally-credential = 1` (the whole value: not 10, not 1x): 1, 0 for
 * another version, -1 if the line sets another entry. */
static inline int version_one(const char *line) {
    const char *p = value_of(line, "tally-credential");
    if (!p) return -1;
    return p[0] == '1' && value_ends(p + 1);
}

/* Whether a line could start a table or a multi-line string: what TOML could hide or
 * move an entry with. `name = "value"  # comment` cannot (not even with """ in the
 * comment); a line that is not `name = value`, or an array or inline table that holds
 * """ or ''', can. */
static inline int may_hide_lines(const char *s) {
    if (*s == '[') return 1;
    const char *p = s;
    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
           *p == '_' || *p == '-')
        p++;
    if (p > s && *(p = skip_blanks(p)) == '=') {
        p = skip_blanks(p + 1);
        if (*p == '"' || *p == '\'') return p[1] == *p && p[2] == *p;
        if (*p != '[' && *p != '{') return 0;
    }
    return strstr(s, "\"\"\"") || strstr(s, "\'\'\'");
}

/* One line of `f` in `buf` (at most cap - 1 bytes, without its LF or CRLF): its length,
 * -1 at the end of the file, -2 for a line too long or holding a NUL byte (read in two
 * parts, its end could set an entry). */
static inline long next_line(FILE *f, char *buf, size_t cap) {
    size_t n = 0;
    int c;
    while ((c = getc(f)) != EOF && c != '\n') {
        if (c == '\0' || n + 1 >= cap) return -2;
        buf[n++] = (char)c;
    }
    if (c == EOF && n == 0) return -1;
    if (n > 0 && buf[n - 1] == '\r') n--;
    buf[n] = '\0';
    return (long)n;
}

/* Whether `id` is an id of spec 4.1: 1 to 64 of A-Z a-z 0-9 . _ - : @ */
static inline int valid_id(const char *id) {
    size_t n = strlen(id);
    if (n < 1 || n > 64) return 0;
    for (; *id; id++)
        if (!((*id >= 'a' && *id <= 'z') || (*id >= 'A' && *id <= 'Z') ||
              (*id >= '0' && *id <= '9') || strchr("._-:@", *id)))
            return 0;
    return 1;
}

/* Reads the file `tally enroll` (or examples/enroll.c) writes: the form of spec 9.2, one
 * `name = value` per line, unknown entries ignored. The TOML it does not read (tables,
 * multi-line strings, escapes, lines over 511 bytes) and duplicate entries are refused,
 * not guessed at: they could hide or move an entry, and this reader never reads values
 * other than a TOML parser's. Returns 0, or -1 with a message on stderr. Every buffer
 * that held the key is wiped; the file is read unbuffered, so that stdio keeps no copy. */
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
    int version = -1, bad = 0, seen = 0, r;
    long n;
    memset(cred, 0, sizeof *cred);
    while (!bad && (n = next_line(f, line, sizeof line)) != -1) {
        const char *s = skip_blanks(line);
        if (n < 0) { bad = 1; break; }
        if (*s == '\0' || *s == '#') continue;
        if (may_hide_lines(s)) { bad = 1; break; }
        int bit = 1;
        if ((r = version_one(s)) >= 0) {
            version = r;
        } else if ((bit = 2, r = string_field(s, "id", cred->id, sizeof cred->id)) ||
                   (bit = 4, r = string_field(s, "key", key_hex, sizeof key_hex)) ||
                   (bit = 8, r = string_field(s, "server", cred->server, sizeof cred->server)) ||
                   (bit = 16, r = string_field(s, "server-key", server_key_hex, sizeof server_key_hex))) {
            if (r < 0) bad = 1;
        } else {
            continue;
        }
        if (seen & bit) bad = 1;
        seen |= bit;
    }
    wipe(line, sizeof line);
    fclose(f);
    /* Spec 9.2: all five entries required; hex digits in either case. */
    int ok = !bad && version == 1 && valid_id(cred->id) && cred->server[0] &&
             hex32(key_hex, cred->key) == 0 && hex32(server_key_hex, cred->server_key) == 0;
    wipe(key_hex, sizeof key_hex);
    if (!ok) {
        wipe(cred, sizeof *cred);
        fprintf(stderr, "%s: not a Tally credential (spec 9.2: tally-credential = 1, id, key, server, server-key)\n", path);
        return -1;
    }
    /* Spec 9.1, 9.2: S in canonical form, the top bit of its last byte clear. X25519
     * ignores that bit but K_id's salt does not: with it set, every sealed id would fail
     * to open at the server, silently. */
    if (cred->server_key[31] & 0x80) {
        wipe(cred, sizeof *cred);
        fprintf(stderr, "%s: its server-key is not in canonical form (spec 9.1: the top bit of its last byte must be clear); copy it again from the enrollment token or the server\n", path);
        return -1;
    }
    return 0;
}

#endif
