/* The floor of fan-out on this machine: what one small TCP write per subscriber costs.
 *
 * N loopback TCP connections; the sender (pinned to one CPU) writes one frame-sized
 * message to every connection, one send(2) each, ROUNDS times with a pause between
 * rounds (like publications at a low rate); a forked receiver (pinned to the other
 * CPUs) drains every connection with epoll.  With -DFLOOR_URING the sender queues the
 * N sends on an io_uring and submits them with one io_uring_enter per 4,096, to show
 * how much of the cost is the system call itself rather than the kernel's TCP path.
 *
 * Usage: floor N ROUNDS SIZE SENDER_CPU RECEIVER_CPU_MASK MODE   (MODE: send | uring)
 * Prints one JSON object.  Driven by `python -m loadtest.floor`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef FLOOR_URING
#include <liburing.h>
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* CPU time of this (sender) process: comparable with a server's CPU per delivery on a
 * busy machine, where wall time also counts the moments the sender was not running. */
static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pin_mask(unsigned long mask) {
    cpu_set_t s;
    CPU_ZERO(&s);
    for (int c = 0; c < 64; c++)
        if (mask & (1UL << c)) CPU_SET(c, &s);
    if (CPU_COUNT(&s)) sched_setaffinity(0, sizeof s, &s);
}

static int fail(const char *what) {
    printf("{\"error\": \"%s: %s\"}\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: floor N ROUNDS SIZE SENDER_CPU RECEIVER_MASK send|uring\n");
        return 2;
    }
    int n = atoi(argv[1]), rounds = atoi(argv[2]), size = atoi(argv[3]);
    int sender_cpu = atoi(argv[4]);
    unsigned long receiver_mask = strtoul(argv[5], NULL, 0);
    int uring = strcmp(argv[6], "uring") == 0;
#ifndef FLOOR_URING
    if (uring) {
        printf("{\"error\": \"built without io_uring\"}\n");
        return 1;
    }
#endif
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    socklen_t al = sizeof a;
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 4096) || getsockname(ls, (void *)&a, &al))
        return fail("listen");
    int *cl = malloc(n * sizeof(int)), *sv = malloc(n * sizeof(int));
    for (int i = 0; i < n; i++) {
        cl[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (cl[i] < 0 || connect(cl[i], (void *)&a, sizeof a)) return fail("connect");
        sv[i] = accept(ls, NULL, NULL);
        if (sv[i] < 0) return fail("accept");
        setsockopt(sv[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(sv[i], F_SETFL, O_NONBLOCK);
        fcntl(cl[i], F_SETFL, O_NONBLOCK);
    }
    int done[2];
    if (pipe(done)) return fail("pipe");
    long want = (long)n * rounds * size;
    pid_t pid = fork();
    if (pid == 0) {                                   /* the receiver */
        pin_mask(receiver_mask);
        int ep = epoll_create1(0);
        for (int i = 0; i < n; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.fd = cl[i]};
            epoll_ctl(ep, EPOLL_CTL_ADD, cl[i], &e);
        }
        long got = 0;
        static char buf[65536];
        struct epoll_event ev[512];
        while (got < want) {
            int k = epoll_wait(ep, ev, 512, 10000);
            if (k <= 0) break;
            for (int j = 0; j < k; j++) {
                ssize_t r = read(ev[j].data.fd, buf, sizeof buf);
                if (r > 0) got += r;
            }
        }
        char ok = got == want ? 'y' : 'n';
        if (write(done[1], &ok, 1) != 1) _exit(1);
        _exit(0);
    }
    pin_mask(1UL << sender_cpu);
#ifdef FLOOR_URING
    struct io_uring ring;
    if (uring) {
        struct io_uring_params p = {0};
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = 65536;
        if (io_uring_queue_init_params(4096, &ring, &p)) return fail("io_uring");
    }
#endif
    char *msg = calloc(1, size);
    double total = 0, worst = 0, best = 1e9, cpu_total = 0;
    long short_writes = 0;
    usleep(200000);
    for (int r = 0; r < rounds; r++) {
        double t0 = now(), c0 = cpu_now();
        if (!uring) {
            for (int i = 0; i < n; i++)
                if (send(sv[i], msg, size, MSG_NOSIGNAL | MSG_DONTWAIT) != size) short_writes++;
        }
#ifdef FLOOR_URING
        else {
            for (int i = 0; i < n; i++) {
                struct io_uring_sqe *s = io_uring_get_sqe(&ring);
                if (!s) {
                    io_uring_submit(&ring);
                    s = io_uring_get_sqe(&ring);
                }
                io_uring_prep_send(s, sv[i], msg, size, MSG_NOSIGNAL | MSG_DONTWAIT);
            }
            io_uring_submit(&ring);
            for (int i = 0; i < n; i++) {
                struct io_uring_cqe *c;
                io_uring_wait_cqe(&ring, &c);
                if (c->res != size) short_writes++;
                io_uring_cqe_seen(&ring, c);
            }
        }
#endif
        double dt = now() - t0;
        cpu_total += cpu_now() - c0;
        total += dt;
        if (dt > worst) worst = dt;
        if (dt < best) best = dt;
        usleep(200000);
    }
    char ok = 'n';
    if (read(done[0], &ok, 1) != 1) ok = 'n';
    waitpid(pid, NULL, 0);
    printf("{\"connections\": %d, \"rounds\": %d, \"size\": %d, \"mode\": \"%s\", "
           "\"us_per_send\": %.3f, \"cpu_us_per_send\": %.3f, "
           "\"round_ms_mean\": %.3f, \"round_ms_best\": %.3f, "
           "\"round_ms_worst\": %.3f, \"short_writes\": %ld, \"all_received\": %s}\n",
           n, rounds, size, uring ? "uring" : "send", total / rounds / n * 1e6,
           cpu_total / rounds / n * 1e6, total / rounds * 1e3, best * 1e3, worst * 1e3, short_writes,
           ok == 'y' ? "true" : "false");
    return 0;
}
