/* sock_tool: stream sockets over AF_VSOCK, TCP, Unix sockets and Firecracker's vsock
 * host side, for kvm-vmm's virtio-net/vsock boot test and benchmark.  Built static at
 * run time (kvm_vmm.sock_tool): the same binary runs in the guest (whose initramfs has
 * no C library) and on the host, so both ends of every measurement run the same loop.
 *
 *   sock_tool [-t SECONDS] listen|connect ADDRESS ACTION [ARGS]
 *
 * ADDRESS: vsock:PORT (listen, any CID), vsock:CID:PORT, tcp:PORT (listen on every
 * address), tcp:IPV4:PORT, unix:PATH, fc:PATH:PORT (connect to a Firecracker-style
 * Unix socket and ask for guest port PORT with "CONNECT PORT\n", reading "OK ...\n").
 *
 * ACTION:
 *   stream CONNS BYTES  CONNS connections at once (accepted or made); on each, send
 *                       BYTES of a pseudo-random stream, shut the sending half, and read
 *                       until the peer shuts its own.  One CONN line per connection:
 *                       what was sent and received, with CRC-32s (zlib's), so that the
 *                       other end, whatever it is, can check both directions.
 *   ping COUNT          one connection: send 1 byte, wait for 1 byte back, COUNT times.
 *   echo                one connection: send back what arrives until end of file.
 *   pipe                one connection, as nc: standard input to the socket (its end
 *                       shuts the sending half) and the socket to standard output (until
 *                       the peer shuts its own), until both are done; 64 KiB a call where busybox nc makes
 *                       1 KiB ones (each call is emulated kernel code in a guest here).
 *                       Sends blocking: for one direction at a time, or a reading peer.
 *                       Its PIPE line goes to standard error.
 *
 * Output lines start with SOCKTOOL; an error prints "SOCKTOOL ERROR ..." and exits 1, a
 * usage error exits 2.  -t bounds the whole run (default 120 s): a peer that never
 * comes is an error, never a hang.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MARK "SOCKTOOL"
#define MAX_CONNS 64
#define CHUNK 65536

enum family { VSOCK, TCP, UNIX_PATH, FIRECRACKER };

struct address {
    enum family family;
    unsigned cid;
    unsigned port;
    int any_cid;
    struct in_addr ipv4;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    const char *text;
};

struct conn {
    int fd;
    int index;
    uint64_t to_send, sent, received;
    uint32_t tx_crc, rx_crc;
    uint64_t rng;
    unsigned char out[CHUNK];
    size_t out_len, out_off;
    int write_shut, eof;
    double started, finished;
};

static double deadline;
/* Where LISTENING goes: standard error for pipe, whose standard output is the data. */
static FILE *notes;
static uint32_t crc_table[256];
static struct conn conns[MAX_CONNS];
static unsigned char in_buf[CHUNK];
static unsigned char pipe_buf[CHUNK];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    printf(MARK " ERROR ");
    vprintf(format, args);
    printf("\n");
    va_end(args);
    fflush(stdout);
    exit(1);
}

static void fail_errno(const char *what, const struct address *address) {
    int error = errno;
    fail("%s %s: errno=%d (%s)", what, address->text, error, strerror(error));
}

static void on_alarm(int signal_number) {
    (void)signal_number;
    static const char line[] = MARK " ERROR timeout: the run's time limit passed\n";
    ssize_t ignored = write(STDOUT_FILENO, line, sizeof(line) - 1);
    (void)ignored;
    _exit(1);
}

static void usage(void) {
    fprintf(stderr,
            "usage: sock_tool [-t SECONDS] listen|connect ADDRESS stream CONNS BYTES|ping "
            "COUNT|echo|pipe\n");
    exit(2);
}

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib's crc32(): running value in, running value out (start from 0). */
static uint32_t crc32_update(uint32_t crc, const unsigned char *data, size_t length) {
    crc = ~crc;
    for (size_t i = 0; i < length; i++)
        crc = crc_table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* xorshift64*: fast enough that the stream's source is never what is measured. */
static uint64_t next_random(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static unsigned long parse_number(const char *text, unsigned long max) {
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || value > max)
        usage();
    return value;
}

static void parse_address(const char *text, int listening, struct address *address) {
    memset(address, 0, sizeof(*address));
    address->text = text;
    const char *rest = strchr(text, ':');
    if (!rest)
        usage();
    size_t kind = (size_t)(rest - text);
    rest++;
    const char *last = strrchr(rest, ':');
    if (kind == 5 && !strncmp(text, "vsock", 5)) {
        address->family = VSOCK;
        if (last) {
            char cid[16];
            if ((size_t)(last - rest) >= sizeof(cid))
                usage();
            memcpy(cid, rest, (size_t)(last - rest));
            cid[last - rest] = 0;
            address->cid = (unsigned)parse_number(cid, UINT32_MAX);
            address->port = (unsigned)parse_number(last + 1, UINT32_MAX);
        } else {
            if (!listening)
                usage();
            address->any_cid = 1;
            address->port = (unsigned)parse_number(rest, UINT32_MAX);
        }
    } else if (kind == 3 && !strncmp(text, "tcp", 3)) {
        address->family = TCP;
        address->ipv4.s_addr = htonl(INADDR_ANY);
        if (last) {
            char host[64];
            if ((size_t)(last - rest) >= sizeof(host))
                usage();
            memcpy(host, rest, (size_t)(last - rest));
            host[last - rest] = 0;
            if (inet_pton(AF_INET, host, &address->ipv4) != 1)
                usage();
            address->port = (unsigned)parse_number(last + 1, 65535);
        } else {
            if (!listening)
                usage();
            address->port = (unsigned)parse_number(rest, 65535);
        }
    } else if (kind == 4 && !strncmp(text, "unix", 4)) {
        address->family = UNIX_PATH;
        if (strlen(rest) >= sizeof(address->path) || !*rest)
            usage();
        strcpy(address->path, rest);
    } else if (kind == 2 && !strncmp(text, "fc", 2) && !listening && last) {
        address->family = FIRECRACKER;
        if ((size_t)(last - rest) >= sizeof(address->path) || last == rest)
            usage();
        memcpy(address->path, rest, (size_t)(last - rest));
        address->path[last - rest] = 0;
        address->port = (unsigned)parse_number(last + 1, UINT32_MAX);
    } else {
        usage();
    }
}

static int new_socket(const struct address *address, struct sockaddr_storage *storage,
                      socklen_t *length) {
    memset(storage, 0, sizeof(*storage));
    int domain;
    if (address->family == VSOCK) {
        struct sockaddr_vm *vm = (struct sockaddr_vm *)storage;
        vm->svm_family = AF_VSOCK;
        vm->svm_cid = address->any_cid ? VMADDR_CID_ANY : address->cid;
        vm->svm_port = address->port;
        *length = sizeof(*vm);
        domain = AF_VSOCK;
    } else if (address->family == TCP) {
        struct sockaddr_in *in = (struct sockaddr_in *)storage;
        in->sin_family = AF_INET;
        in->sin_addr = address->ipv4;
        in->sin_port = htons((uint16_t)address->port);
        *length = sizeof(*in);
        domain = AF_INET;
    } else {
        struct sockaddr_un *un = (struct sockaddr_un *)storage;
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, address->path);
        *length = sizeof(*un);
        domain = AF_UNIX;
    }
    int fd = socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail_errno("socket", address);
    if (address->family == TCP) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    }
    return fd;
}

static int remaining_ms(void) {
    double left = deadline - now();
    if (left <= 0)
        return 0;
    return (int)(left * 1000) + 1;
}

/* Waits for fd to be ready for events; a passed deadline is an error. */
static void wait_for(int fd, short events, const char *what, const struct address *address) {
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int ms = remaining_ms();
        if (ms == 0)
            fail("timeout %s %s", what, address->text);
        int n = poll(&p, 1, ms);
        if (n > 0)
            return;
        if (n < 0 && errno != EINTR)
            fail_errno("poll", address);
    }
}

static int open_listener(const struct address *address) {
    struct sockaddr_storage storage;
    socklen_t length;
    if (address->family == UNIX_PATH)
        unlink(address->path);
    int fd = new_socket(address, &storage, &length);
    if (bind(fd, (struct sockaddr *)&storage, length) < 0)
        fail_errno("bind", address);
    if (listen(fd, MAX_CONNS) < 0)
        fail_errno("listen", address);
    fprintf(notes, MARK " LISTENING %s\n", address->text);
    fflush(notes);
    return fd;
}

static int accept_one(int listener, const struct address *address) {
    wait_for(listener, POLLIN, "accept", address);
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        fail_errno("accept", address);
    if (address->family == TCP) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    return fd;
}

/* Firecracker's host side: "CONNECT <port>\n" out, "OK <host port>\n" back. */
static void firecracker_handshake(int fd, const struct address *address) {
    char line[32];
    int n = snprintf(line, sizeof(line), "CONNECT %u\n", address->port);
    if (write(fd, line, (size_t)n) != n)
        fail_errno("CONNECT", address);
    size_t got = 0;
    for (;;) {
        wait_for(fd, POLLIN, "OK", address);
        ssize_t r = read(fd, line + got, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fail_errno("OK", address);
        if (r == 0)
            fail("refused %s: the socket closed before OK", address->text);
        if (line[got] == '\n')
            break;
        if (++got == sizeof(line) - 1)
            fail("refused %s: not an OK line", address->text);
    }
    line[got] = 0;
    if (strncmp(line, "OK ", 3))
        fail("refused %s: %s", address->text, line);
}

static int connect_one(const struct address *address) {
    struct sockaddr_storage storage;
    socklen_t length;
    int fd = new_socket(address, &storage, &length);
    while (connect(fd, (struct sockaddr *)&storage, length) < 0) {
        if (errno != EINTR)
            fail_errno("connect", address);
    }
    if (address->family == FIRECRACKER)
        firecracker_handshake(fd, address);
    return fd;
}

static void set_nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void start_conn(struct conn *c, int fd, int index, uint64_t bytes, int listening) {
    memset(c, 0, sizeof(*c));
    c->fd = fd;
    c->index = index;
    c->to_send = bytes;
    /* Each end and each connection sends a stream of its own. */
    c->rng = 0x9E3779B97F4A7C15ull * (uint64_t)(index + 1) ^ (listening ? 0xA5A5 : 0x5A5A);
    c->started = now();
    set_nonblocking(fd);
}

static void fill(struct conn *c) {
    uint64_t left = c->to_send - c->sent;
    size_t n = left < CHUNK ? (size_t)left : CHUNK;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = next_random(&c->rng);
        memcpy(c->out + i, &r, n - i < 8 ? n - i : 8);
    }
    c->tx_crc = crc32_update(c->tx_crc, c->out, n);
    c->out_len = n;
    c->out_off = 0;
}

static int conn_done(const struct conn *c) {
    return c->write_shut && c->eof;
}

/* One step of a connection: write what it can, read what is there. */
static void step(struct conn *c, short revents, const struct address *address) {
    if ((revents & (POLLOUT | POLLERR | POLLHUP)) && !c->write_shut) {
        if (c->out_off == c->out_len && c->sent < c->to_send)
            fill(c);
        while (c->out_off < c->out_len) {
            ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                break;
            if (n < 0)
                fail_errno("write", address);
            c->out_off += (size_t)n;
            c->sent += (uint64_t)n;
            if (c->out_off == c->out_len && c->sent < c->to_send)
                fill(c);
        }
        if (c->sent == c->to_send && c->out_off == c->out_len) {
            if (shutdown(c->fd, SHUT_WR) < 0 && errno != ENOTCONN)
                fail_errno("shutdown", address);
            c->write_shut = 1;
        }
    }
    if ((revents & (POLLIN | POLLERR | POLLHUP)) && !c->eof) {
        for (;;) {
            ssize_t n = read(c->fd, in_buf, sizeof(in_buf));
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                break;
            if (n < 0)
                fail_errno("read", address);
            if (n == 0) {
                c->eof = 1;
                break;
            }
            c->rx_crc = crc32_update(c->rx_crc, in_buf, (size_t)n);
            c->received += (uint64_t)n;
        }
    }
    if (conn_done(c) && c->finished == 0) {
        c->finished = now();
        printf(MARK " CONN index=%d sent=%llu sent_crc=%08x received=%llu received_crc=%08x "
                    "seconds=%.6f\n",
               c->index, (unsigned long long)c->sent, c->tx_crc,
               (unsigned long long)c->received, c->rx_crc, c->finished - c->started);
        fflush(stdout);
        close(c->fd);
        c->fd = -1;
    }
}

static void stream(const struct address *address, int listening, int count, uint64_t bytes) {
    int listener = listening ? open_listener(address) : -1;
    double started = now();
    int opened = 0, finished = 0;
    if (!listening) {
        for (; opened < count; opened++)
            start_conn(&conns[opened], connect_one(address), opened, bytes, 0);
    }
    while (finished < count) {
        struct pollfd polls[MAX_CONNS + 1];
        struct conn *owners[MAX_CONNS + 1];
        int n = 0;
        if (listening && opened < count) {
            polls[n] = (struct pollfd){.fd = listener, .events = POLLIN};
            owners[n++] = NULL;
        }
        for (int i = 0; i < opened; i++) {
            struct conn *c = &conns[i];
            if (c->fd < 0)
                continue;
            short events = (short)((c->write_shut ? 0 : POLLOUT) | (c->eof ? 0 : POLLIN));
            polls[n] = (struct pollfd){.fd = c->fd, .events = events};
            owners[n++] = c;
        }
        int ms = remaining_ms();
        if (ms == 0)
            fail("timeout stream %s: %d of %d connections finished", address->text, finished,
                 count);
        int ready = poll(polls, (nfds_t)n, ms);
        if (ready < 0 && errno != EINTR)
            fail_errno("poll", address);
        for (int i = 0; i < n && ready > 0; i++) {
            if (!polls[i].revents)
                continue;
            if (owners[i] == NULL) {
                int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
                if (fd < 0)
                    fail_errno("accept", address);
                start_conn(&conns[opened], fd, opened, bytes, 1);
                opened++;
                continue;
            }
            step(owners[i], polls[i].revents, address);
            if (owners[i]->fd < 0)
                finished++;
        }
    }
    printf(MARK " DONE connections=%d seconds=%.6f\n", count, now() - started);
    if (listener >= 0)
        close(listener);
}

static void read_exactly(int fd, unsigned char *byte, const struct address *address) {
    for (;;) {
        ssize_t n = read(fd, byte, 1);
        if (n == 1)
            return;
        if (n == 0)
            fail("eof %s: the peer closed", address->text);
        if (errno != EINTR && errno != EAGAIN)
            fail_errno("read", address);
        wait_for(fd, POLLIN, "read", address);
    }
}

static void ping(int fd, long count, const struct address *address) {
    unsigned char byte = 0;
    double started = now();
    for (long i = 0; i < count; i++) {
        byte = (unsigned char)i;
        if (write(fd, &byte, 1) != 1)
            fail_errno("write", address);
        unsigned char back;
        read_exactly(fd, &back, address);
        if (back != byte)
            fail("ping %s: sent %u, got %u back", address->text, byte, back);
    }
    double seconds = now() - started;
    printf(MARK " PING count=%ld seconds=%.6f\n", count, seconds);
}

static void echo(int fd, const struct address *address) {
    long echoed = 0;
    for (;;) {
        ssize_t n = read(fd, in_buf, sizeof(in_buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail_errno("read", address);
        if (n == 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, in_buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                fail_errno("write", address);
            off += w;
        }
        echoed += n;
    }
    printf(MARK " ECHO bytes=%ld\n", echoed);
}

static void write_all(int fd, const unsigned char *data, size_t length, const char *what,
                      const struct address *address) {
    while (length) {
        ssize_t n = write(fd, data, length);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail_errno(what, address);
        data += n;
        length -= (size_t)n;
    }
}

static void pipe_through(int fd, const struct address *address) {
    int input_open = 1, socket_open = 1;
    uint64_t sent = 0, received = 0;
    double started = now();
    while (input_open || socket_open) {
        struct pollfd polls[2] = {{.fd = fd, .events = POLLIN},
                                  {.fd = STDIN_FILENO, .events = POLLIN}};
        int ms = remaining_ms();
        if (ms == 0)
            fail("timeout pipe %s: sent %llu, received %llu", address->text,
                 (unsigned long long)sent, (unsigned long long)received);
        /* A finished half is polled no more (fd -1 is skipped). */
        if (!socket_open)
            polls[0].fd = -1;
        if (poll(polls, input_open ? 2 : 1, ms) < 0) {
            if (errno == EINTR)
                continue;
            fail_errno("poll", address);
        }
        if (polls[0].revents) {
            ssize_t n = read(fd, in_buf, sizeof(in_buf));
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                fail_errno("read", address);
            if (n == 0)
                socket_open = 0;
            if (n > 0) {
                write_all(STDOUT_FILENO, in_buf, (size_t)n, "stdout", address);
                received += (uint64_t)n;
            }
        }
        if (input_open && polls[1].revents) {
            ssize_t n = read(STDIN_FILENO, pipe_buf, sizeof(pipe_buf));
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                fail_errno("stdin", address);
            if (n == 0) {
                if (shutdown(fd, SHUT_WR) < 0 && errno != ENOTCONN)
                    fail_errno("shutdown", address);
                input_open = 0;
            } else if (n > 0) {
                write_all(fd, pipe_buf, (size_t)n, "write", address);
                sent += (uint64_t)n;
            }
        }
    }
    fprintf(stderr, MARK " PIPE sent=%llu received=%llu seconds=%.6f\n",
            (unsigned long long)sent, (unsigned long long)received, now() - started);
}

int main(int argc, char **argv) {
    double seconds = 120;
    int arg = 1;
    if (arg + 1 < argc && !strcmp(argv[arg], "-t")) {
        seconds = (double)parse_number(argv[arg + 1], 86400);
        arg += 2;
    }
    if (argc - arg < 3)
        usage();
    int listening;
    if (!strcmp(argv[arg], "listen"))
        listening = 1;
    else if (!strcmp(argv[arg], "connect"))
        listening = 0;
    else
        usage();
    struct address address;
    parse_address(argv[arg + 1], listening, &address);
    const char *action = argv[arg + 2];
    notes = strcmp(action, "pipe") ? stdout : stderr;
    char **rest = argv + arg + 3;
    int rest_count = argc - arg - 3;

    signal(SIGPIPE, SIG_IGN);
    crc_init();
    setvbuf(stdout, NULL, _IOLBF, 0);
    deadline = now() + seconds;
    /* Blocking calls (echo's reads, a connect) are bounded too. */
    signal(SIGALRM, on_alarm);
    alarm((unsigned)seconds + 1);

    if (!strcmp(action, "stream") && rest_count == 2) {
        int count = (int)parse_number(rest[0], MAX_CONNS);
        if (count == 0)
            usage();
        stream(&address, listening, count, parse_number(rest[1], UINT64_MAX >> 1));
        return 0;
    }
    int single = (!strcmp(action, "echo") || !strcmp(action, "pipe")) && !rest_count;
    if ((!strcmp(action, "ping") && rest_count == 1) || single) {
        long count = rest_count ? (long)parse_number(rest[0], 1L << 40) : 0;
        int fd;
        if (listening) {
            int listener = open_listener(&address);
            fd = accept_one(listener, &address);
            close(listener);
        } else {
            fd = connect_one(&address);
        }
        if (rest_count)
            ping(fd, count, &address);
        else if (!strcmp(action, "echo"))
            echo(fd, &address);
        else
            pipe_through(fd, &address);
        close(fd);
        return 0;
    }
    usage();
    return 2;
}
