/*
 * forge.proc — process control for the local target.
 *
 * The broker starts service processes on this machine (redis-server, ...), as their own
 * user when asked, supervises them, and after its own restart adopts them by identity:
 * pid + start time (field 22 of /proc/<pid>/stat), so a recycled pid is never signalled.
 *
 * Isolation: a process may start in new mount, PID, IPC and UTS namespaces with a read-only
 * view of the root tree (one writable directory, private /tmp and /dev/shm, hidden paths, its
 * own /proc), as a user with no capabilities, in given cgroups and under an open-file limit;
 * a command may run inside the namespaces of such a process (docs/isolation.md says why this
 * is done here rather than with bubblewrap).
 *
 * Threads: the broker is multi-threaded, each thread with its own lua_State. Nothing
 * here keeps mutable static state; the child side of fork() only makes
 * async-signal-safe calls (no malloc, no Lua, no locks); waitpid() is only ever called
 * on one given pid, never -1, because other threads wait on their own children.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>

#include "forge/forge.h"
#include "lnet.h"

#ifndef PIDFD_SIGNAL_PROCESS_GROUP
#define PIDFD_SIGNAL_PROCESS_GROUP (1U << 2)
#endif

#define PROC_RUN_MT       "forge.proc.run"
#define POLL_INTERVAL_NS  25000000L          /* stop()/wait() poll every 25 ms */
#define STOP_KILL_WAIT_S  5.0                /* bound on the wait after SIGKILL */
#define RUN_GRACE_MS      100                /* output drain after the child exits */
#define DEFAULT_PATH      "/usr/local/bin:/usr/bin:/bin"

extern char **environ;


/* ------------------------------------------------------------------------ */
/* small helpers                                                            */
/* ------------------------------------------------------------------------ */

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}


/* Sleep `s` seconds, resuming after EINTR. */
static void sleep_s(double s)
{
    if (s <= 0)
        return;
    struct timespec req, rem;
    req.tv_sec = (time_t)s;
    req.tv_nsec = (long)((s - (double)req.tv_sec) * 1e9);
    if (req.tv_nsec >= 1000000000L)
        req.tv_nsec = 999999999L;
    while (nanosleep(&req, &rem) != 0 && errno == EINTR)
        req = rem;
}



struct proc_stat {
    char state;                 /* R S D Z T X ... */
    pid_t pgrp;
    long long start_time;       /* clock ticks since boot */
};


/*
 * Read /proc/<pid>/stat. Returns 0, or -errno (-ENOENT / -ESRCH when there is no such
 * process). The comm field may hold spaces and ')', so parsing starts after the last ')'.
 */
static int read_stat(pid_t pid, struct proc_stat *ps)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n;
    do
        n = read(fd, buf, sizeof buf - 1);
    while (n < 0 && errno == EINTR);
    int err = errno;
    close(fd);
    if (n < 0)
        return err == ESRCH ? -ENOENT : -err;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -EINVAL;
    p += 2;                                     /* field 3: state */
    ps->state = *p;
    /* fields 4.. are numbers: ppid(4) pgrp(5) ... starttime(22) */
    int field = 3;
    char *end = p + 1;
    while (field < 22) {
        long long v = strtoll(end, &end, 10);
        field++;
        if (field == 5)
            ps->pgrp = (pid_t)v;
        if (field == 22)
            ps->start_time = v;
        if (*end == '\0' && field < 22)
            return -EINVAL;
    }
    return 0;
}


/* 1 when the process exists, is not a zombie (or dead) and has `start_time`. */
static int identity_matches(pid_t pid, long long start_time, struct proc_stat *ps)
{
    ps->start_time = -1;
    if (read_stat(pid, ps) != 0)
        return 0;
    if (ps->state == 'Z' || ps->state == 'X' || ps->state == 'x')
        return 0;
    return ps->start_time == start_time;
}


/*
 * Reap `pid` if it is our child and has exited (never blocks, never waits on -1).
 * Returns 1 when it is our child but cannot be reaped yet: a multi-threaded process (redis)
 * shows its leader as a zombie while its other threads are still exiting, and waitpid()
 * answers 0 until they are gone.
 */
static int reap_if_exited(pid_t pid)
{
    int status, rc;
    while ((rc = waitpid(pid, &status, WNOHANG)) < 0 && errno == EINTR)
        ;
    return rc == 0;
}


/*
 * The liveness test behind alive() and stop(): identity matches and not a zombie.
 * A zombie with the right start time is reaped when it is our child; one of ours that
 * cannot be reaped yet (threads still exiting) counts as alive, so stop() waits for it.
 */
static int check_alive(pid_t pid, long long start_time)
{
    struct proc_stat ps;
    if (read_stat(pid, &ps) != 0)
        return 0;
    if (ps.start_time != start_time)
        return 0;                               /* recycled pid: not ours to touch */
    if (ps.state == 'Z' || ps.state == 'X' || ps.state == 'x')
        return reap_if_exited(pid);             /* still exiting: alive until reaped */
    return 1;
}


static const struct { const char *name; int sig; } signames[] = {
    {"TERM", SIGTERM}, {"KILL", SIGKILL}, {"HUP", SIGHUP}, {"INT", SIGINT},
    {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"QUIT", SIGQUIT}, {"STOP", SIGSTOP},
    {"CONT", SIGCONT}, {NULL, 0},
};


/* The signal called `name` ("TERM", "SIGTERM", in any case), or -1. */
static int signal_by_name(const char *name)
{
    if (strncasecmp(name, "SIG", 3) == 0)
        name += 3;
    for (int i = 0; signames[i].name; i++)
        if (strcasecmp(name, signames[i].name) == 0)
            return signames[i].sig;
    return -1;
}


/* Signal at `idx`: a name ("TERM", "SIGTERM") or a number 0..NSIG-1. May longjmp. */
static int check_signal(lua_State *L, int idx)
{
    if (lua_type(L, idx) == LUA_TNUMBER) {
        lua_Integer s = luaL_checkinteger(L, idx);
        luaL_argcheck(L, s >= 0 && s < NSIG, idx, "signal number out of range");
        return (int)s;
    }
    int sig = signal_by_name(luaL_checkstring(L, idx));
    if (sig < 0)
        return luaL_argerror(L, idx, "expected a signal name (TERM, KILL, HUP, INT, USR1, USR2, QUIT, STOP, "
                                     "CONT) or number");
    return sig;
}


static pid_t check_pid(lua_State *L, int idx)
{
    lua_Integer pid = luaL_checkinteger(L, idx);
    luaL_argcheck(L, pid > 1 && pid <= INT_MAX, idx, "pid must be an integer > 1");
    return (pid_t)pid;
}


static int pidfd_open_(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}


static int pidfd_signal_(int pidfd, int sig, unsigned flags)
{
#ifdef SYS_pidfd_send_signal
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, flags);
#else
    (void)pidfd; (void)sig; (void)flags;
    errno = ENOSYS;
    return -1;
#endif
}


/*
 * Signal the process `pid` whose start time must be `start_time`: its process group when
 * it leads one, else the process alone. A pidfd pins the process while its identity is
 * checked, so a recycled pid is never signalled. Returns 0, -ESRCH when the identity does
 * not match (gone), or another -errno.
 */
static int signal_identity(pid_t pid, long long start_time, int sig)
{
    struct proc_stat ps = {0, 0, -1};
    int pidfd = pidfd_open_(pid);
    if (pidfd < 0 && errno == ESRCH)
        return -ESRCH;
    if (!identity_matches(pid, start_time, &ps)) {
        if (pidfd >= 0)
            close(pidfd);
        if (ps.start_time == start_time)
            reap_if_exited(pid);                /* our zombie: reap it */
        return -ESRCH;
    }
    int leader = ps.pgrp == pid;
    int rc = -1;
    if (pidfd >= 0) {
        rc = pidfd_signal_(pidfd, sig, leader ? PIDFD_SIGNAL_PROCESS_GROUP : 0);
        if (rc < 0 && (errno == EINVAL || errno == ENOSYS))
            rc = kill(leader ? -pid : pid, sig);    /* kernel without group flag */
        close(pidfd);
    } else {
        rc = kill(leader ? -pid : pid, sig);
    }
    return rc < 0 ? -errno : 0;
}


/* A pidfd (CLOEXEC) of the live process `pid` whose start time is `start_time`, or -1. */
static int pidfd_of_identity(pid_t pid, long long start_time)
{
    struct proc_stat ps;
    int fd = pidfd_open_(pid);
    if (fd >= 0 && !identity_matches(pid, start_time, &ps)) {
        close(fd);
        fd = -1;
    }
    return fd;
}


/* Push {code=, signal=} for a wait status. */
static void push_status(lua_State *L, int status)
{
    lua_createtable(L, 0, 2);
    if (WIFEXITED(status)) {
        lua_pushinteger(L, WEXITSTATUS(status));
        lua_setfield(L, -2, "code");
    } else if (WIFSIGNALED(status)) {
        lua_pushinteger(L, WTERMSIG(status));
        lua_setfield(L, -2, "signal");
    }
}




/* ------------------------------------------------------------------------ */
/* the child side of fork()                                                 */
/* ------------------------------------------------------------------------ */

/* Everything the child needs, prepared by the parent (pointers anchored in Lua). */
struct child_spec {
    char *const *argv;
    char *const *envp;          /* NULL: inherit environ */
    const char *path;           /* PATH used to find argv[0] when it has no '/' */
    const char *cwd;            /* NULL: stay */
    const char *user;           /* NULL: keep our ids; else become uid, gid, groups */
    uid_t uid;
    gid_t gid;
    const gid_t *groups;        /* supplementary groups (the primary one included) */
    size_t ngroups;
    int fd_in, fd_out, fd_err;  /* become 0, 1, 2 */
    int errfd;                  /* CLOEXEC pipe: struct child_error on failure */
    int short_lived;            /* run(): owns its stdio pipes, dies with the broker */
    const char *const *cgroups; /* cgroup.procs files to join (NULL-terminated), or NULL */
    rlim_t nofile;              /* RLIMIT_NOFILE (soft and hard), or 0: inherited */
    const struct ns_view *view; /* start in new namespaces with this view, or NULL */
    int join_fd;                /* pidfd of a process whose namespaces to enter, or -1 */
};

/*
 * A sandbox: new mount, PID, IPC and UTS namespaces (not the network), the whole root tree
 * read-only, `writable` bound read-write at its own path, private /tmp and /dev/shm, each
 * `hide` entry emptied (a directory becomes an empty read-only tmpfs, a file /dev/null), and
 * a /proc that shows the new PID namespace only.
 */
struct ns_view {
    const char *writable;
    const char *const *hide;    /* NULL-terminated */
    const char *hostname;       /* NULL: the broker's */
};

/* Where the child failed; the user stages index user_steps[] from STAGE_SETGROUPS. */
enum {
    STAGE_EXEC = 0, STAGE_CHDIR = 1, STAGE_SETUP = 2,
    STAGE_SETGROUPS = 3, STAGE_SETGID = 4, STAGE_SETUID = 5, STAGE_NO_NEW_PRIVS = 6,
    STAGE_CGROUP = 7, STAGE_RLIMIT = 8, STAGE_SETNS = 9, STAGE_CAPS = 10, STAGE_VIEW = 11,
};

static const char *const user_steps[] = {"setgroups", "setgid", "setuid", "prctl(PR_SET_NO_NEW_PRIVS)"};

/* The steps of building a sandbox's view (STAGE_VIEW), as error messages name them. */
enum {
    VIEW_PRIVATE, VIEW_OPEN_WRITABLE, VIEW_TREE, VIEW_RDONLY, VIEW_ATTACH, VIEW_PIVOT, VIEW_TMP,
    VIEW_SHM, VIEW_HIDE, VIEW_MKDIR, VIEW_BIND, VIEW_SEAL, VIEW_PROC, VIEW_HOSTNAME,
};

static const char *const view_steps[] = {
    "making mounts private", "opening the writable directory", "copying the root tree",
    "making the root tree read-only", "attaching the new root", "pivot_root", "mounting a private /tmp",
    "mounting a private /dev/shm", "hiding", "creating the mount point", "binding the writable directory",
    "making read-only", "mounting /proc", "setting the host name",
};

/* What a failed child reports through errfd. */
struct child_error {
    int stage, err;
    int step;                   /* STAGE_VIEW: VIEW_* */
    int index;                  /* the cgroups[] or hide[] entry at fault, or -1 */
};


static FORGE_NORETURN void child_fail_at(int errfd, int stage, int err, int step, int index)
{
    struct child_error msg = {stage, err, step, index};
    ssize_t n;
    do
        n = write(errfd, &msg, sizeof msg);
    while (n < 0 && errno == EINTR);
    _exit(127);
}


static FORGE_NORETURN void child_fail(int errfd, int stage, int err)
{
    child_fail_at(errfd, stage, err, 0, -1);
}


static FORGE_NORETURN void view_fail(int errfd, int step, int index)
{
    child_fail_at(errfd, STAGE_VIEW, errno, step, index);
}


static void close_from(unsigned lo, unsigned hi)
{
    if (lo > hi)
        return;
#ifdef SYS_close_range
    if (syscall(SYS_close_range, lo, hi, 0) == 0)
        return;
#endif
    struct rlimit rl;
    unsigned max = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < max)
        max = (unsigned)rl.rlim_cur;
    for (unsigned fd = lo; fd <= hi && fd < max; fd++)
        close((int)fd);
}


/*
 * glibc's sigaction() refuses the signals it reserves for itself (SIGCANCEL, SIGSETXID),
 * yet a parent may have them ignored, and SIG_IGN survives exec. Reset them with the raw
 * system call where the kernel's struct layout is known.
 */
static void reset_reserved_signal(int sig)
{
#if defined(SYS_rt_sigaction) && (defined(__x86_64__) || defined(__aarch64__))
    struct {
        void (*handler)(int);
        unsigned long flags;
        void (*restorer)(void);
        unsigned long mask;
    } ksa = {SIG_DFL, 0, NULL, 0};
    syscall(SYS_rt_sigaction, sig, &ksa, NULL, sizeof ksa.mask);
#else
    (void)sig;
#endif
}


/*
 * Become cs->user: groups, then gid, then uid (each step needs the privilege the next
 * one drops), and no exec may grant privileges again (setuid binaries, file caps).
 * Async-signal-safe: the parent resolved every id.
 */
static void child_become_user(const struct child_spec *cs, int errfd)
{
    /*
     * A run() command's stdio are pipes the broker made: hand them to the user, or
     * `initdb --pwfile=/dev/stdin` cannot reopen its own stdin. Only pipes: never a file
     * such as /dev/null.
     */
    for (int fd = 0; cs->short_lived && fd <= 2; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode) && fchown(fd, cs->uid, cs->gid) < 0)
            child_fail(errfd, STAGE_SETUP, errno);
    }
    /* raw system calls: the child of a raw clone() (new namespaces) shares glibc's idea of the
       parent's threads, and glibc's set*id() would try to signal them all */
    if (syscall(SYS_setgroups, cs->ngroups, cs->groups) < 0)
        child_fail(errfd, STAGE_SETGROUPS, errno);
    if (syscall(SYS_setgid, cs->gid) < 0)
        child_fail(errfd, STAGE_SETGID, errno);
    if (syscall(SYS_setuid, cs->uid) < 0)
        child_fail(errfd, STAGE_SETUID, errno);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_fail(errfd, STAGE_NO_NEW_PRIVS, errno);
}


/* Join each cgroup in cs->cgroups (writing 0 to cgroup.procs moves the writer). */
static void child_join_cgroups(const struct child_spec *cs, int errfd)
{
    for (int i = 0; cs->cgroups && cs->cgroups[i]; i++) {
        int fd = open(cs->cgroups[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1)
            child_fail_at(errfd, STAGE_CGROUP, errno, 0, i);
        close(fd);
    }
}


/*
 * Enter the namespaces of the process behind cs->join_fd, then fork: the command goes on in
 * them as a member of that PID namespace, while this process (setns does not move its caller
 * into a PID namespace) waits outside and exits as the command did.
 */
static void child_join_namespaces(const struct child_spec *cs, int errfd)
{
    if (setns(cs->join_fd, CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID) < 0)
        child_fail(errfd, STAGE_SETNS, errno);
    close(cs->join_fd);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    pid_t pid = _Fork();
    if (pid < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    if (pid == 0)
        return;
    close_from(0, ~0U);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (WIFSIGNALED(status))
        kill(getpid(), WTERMSIG(status));
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}


/* mkdir -p of an absolute path; 0 or -1 (errno). */
static int mkdir_p(const char *path)
{
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -1;
        if (c == '\0')
            return 0;
        *p = c;
    }
}


/* Empty `path` in the view: a directory gets a tmpfs (made read-only later, once the writable
 * directory's mount point exists: returns 1), a file /dev/null; an absent path needs nothing.
 * Returns 0, 1, or -1 (errno). */
static int hide_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(st.st_mode))
        return mount("/dev/null", path, NULL, MS_BIND, NULL);
    return mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m") < 0 ? -1 : 1;
}


/*
 * Build the view of cs->view, in the new mount namespace: a read-only recursive copy of the
 * root tree becomes the root (pivot_root), then private /tmp and /dev/shm, the hidden paths,
 * the writable directory (taken before the copy hid it) and a /proc of our PID namespace.
 */
static void child_build_view(const struct ns_view *v, int errfd)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        view_fail(errfd, VIEW_PRIVATE, -1);
    int wfd = open_tree(AT_FDCWD, v->writable, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (wfd < 0)
        view_fail(errfd, VIEW_OPEN_WRITABLE, -1);
    int root = open_tree(AT_FDCWD, "/", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (root < 0)
        view_fail(errfd, VIEW_TREE, -1);
    struct mount_attr ro = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, .propagation = MS_PRIVATE};
    if (mount_setattr(root, "", AT_EMPTY_PATH | AT_RECURSIVE, &ro, sizeof ro) < 0)
        view_fail(errfd, VIEW_RDONLY, -1);
    if (move_mount(root, "", AT_FDCWD, "/", MOVE_MOUNT_F_EMPTY_PATH) < 0 || fchdir(root) < 0)
        view_fail(errfd, VIEW_ATTACH, -1);
    /* pivot_root(".", ".") stacks the old root on the new one; detaching it leaves the new */
    if (syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        view_fail(errfd, VIEW_PIVOT, -1);
    close(root);
    if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
        view_fail(errfd, VIEW_TMP, -1);
    struct stat st;
    if (stat("/dev/shm", &st) == 0 && mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
        view_fail(errfd, VIEW_SHM, -1);
    unsigned char tmpfs[1024];                  /* read_paths() allows 1024 */
    for (int i = 0; v->hide[i]; i++)
        if ((tmpfs[i] = (unsigned char)hide_path(v->hide[i])) == (unsigned char)-1)
            view_fail(errfd, VIEW_HIDE, i);
    mode_t mask = umask(0);                     /* the mount point's parents: passable by all */
    if (mkdir_p(v->writable) < 0)
        view_fail(errfd, VIEW_MKDIR, -1);
    umask(mask);
    if (move_mount(wfd, "", AT_FDCWD, v->writable, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        view_fail(errfd, VIEW_BIND, -1);
    close(wfd);
    for (int i = 0; v->hide[i]; i++)
        if (tmpfs[i] == 1 && mount(NULL, v->hide[i], NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV |
                                   MS_NOEXEC, NULL) < 0)
            view_fail(errfd, VIEW_SEAL, i);
    umount2("/proc", MNT_DETACH);               /* the broker's /proc, copied with the tree */
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        view_fail(errfd, VIEW_PROC, -1);
    if (v->hostname && sethostname(v->hostname, strlen(v->hostname)) < 0)
        view_fail(errfd, VIEW_HOSTNAME, -1);
}


/* While still root: empty the bounding and ambient capability sets, so nothing exec'd later
 * can regain a capability. */
static void child_drop_bounding(int errfd)
{
    int cap = 0;
    while (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
        cap++;
    if (errno != EINVAL || cap == 0 || prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        child_fail(errfd, STAGE_CAPS, errno);
}


/* After the uid change (which empties the permitted and effective sets): the inheritable set too. */
static void child_clear_caps(int errfd)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) < 0)
        child_fail(errfd, STAGE_CAPS, errno);
}


/* Runs in the child: async-signal-safe calls only. Never returns. */
static FORGE_NORETURN void child_exec(const struct child_spec *cs)
{
    int errfd = cs->errfd;

    /* Dispositions back to default while every signal is still blocked, then unblock. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && sigaction(sig, &sa, NULL) < 0)
            reset_reserved_signal(sig);         /* libc refuses its own (32, 33) */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    if (setsid() < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    child_join_cgroups(cs, errfd);              /* first: a view makes /sys/fs/cgroup read-only */
    if (cs->join_fd >= 0)
        child_join_namespaces(cs, errfd);

    /* Lift every fd we need above 2 first, so the dup2()s below cannot clobber one. */
    int e = fcntl(errfd, F_DUPFD_CLOEXEC, 3);
    int in = fcntl(cs->fd_in, F_DUPFD_CLOEXEC, 3);
    int out = fcntl(cs->fd_out, F_DUPFD_CLOEXEC, 3);
    int err = fcntl(cs->fd_err, F_DUPFD_CLOEXEC, 3);
    if (e < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    errfd = e;
    if (in < 0 || out < 0 || err < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    close_from(3, (unsigned)errfd - 1);
    close_from((unsigned)errfd + 1, ~0U);

    struct rlimit nofile = {cs->nofile, cs->nofile};
    if (cs->nofile && setrlimit(RLIMIT_NOFILE, &nofile) < 0)
        child_fail(errfd, STAGE_RLIMIT, errno);
    int sandboxed = cs->view || cs->join_fd >= 0;
    if (cs->view)
        child_build_view(cs->view, errfd);
    if (sandboxed)
        child_drop_bounding(errfd);
    if (cs->user)
        child_become_user(cs, errfd);           /* before chdir and exec: checked as the user */
    if (sandboxed) {
        child_clear_caps(errfd);
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            child_fail(errfd, STAGE_NO_NEW_PRIVS, errno);
    }
    /* a command (initdb, pg_basebackup) must not outlive a killed broker and run twice; set
       after the uid change, which clears it. The first process of a PID namespace ignores a
       signal it has no handler for, unless it is SIGKILL. */
    if (cs->short_lived && prctl(PR_SET_PDEATHSIG, cs->view ? SIGKILL : SIGTERM, 0, 0, 0) < 0)
        child_fail(errfd, STAGE_SETUP, errno);
    if (cs->cwd && chdir(cs->cwd) < 0)
        child_fail(errfd, STAGE_CHDIR, errno);

    char *const *envp = cs->envp ? cs->envp : environ;
    const char *file = cs->argv[0];
    if (strchr(file, '/')) {
        execve(file, cs->argv, envp);
        child_fail(errfd, STAGE_EXEC, errno);
    }

    /* PATH search as execvp does it, without malloc. */
    char buf[PATH_MAX];
    size_t flen = strlen(file);
    int saw_eacces = 0, last = ENOENT;
    const char *p = cs->path;
    for (;;) {
        const char *colon = strchr(p, ':');
        size_t dlen = colon ? (size_t)(colon - p) : strlen(p);
        if (dlen == 0) {                        /* empty element: current directory */
            buf[0] = '.';
            dlen = 1;
        } else if (dlen < sizeof buf) {
            memcpy(buf, p, dlen);
        }
        if (dlen + 1 + flen < sizeof buf) {
            buf[dlen] = '/';
            memcpy(buf + dlen + 1, file, flen + 1);
            execve(buf, cs->argv, envp);
            switch (errno) {
            case EACCES:
                saw_eacces = 1;
                break;
            case ENOENT: case ENOTDIR: case ESTALE: case ELOOP: case ENAMETOOLONG: case ENODEV:
            case ETIMEDOUT:
                break;
            default:
                child_fail(errfd, STAGE_EXEC, errno);
            }
            last = errno;
        }
        if (!colon)
            break;
        p = colon + 1;
    }
    child_fail(errfd, STAGE_EXEC, saw_eacces ? EACCES : (last == ENOTDIR ? ENOENT : last));
}


/*
 * fork + exec `cs` (a clone into new namespaces when cs->view); the caller owns every fd in
 * it (they stay open here). On success returns the pid. On failure returns -1 and fills `ce`:
 * stage -1 for a failed pipe/fork in the parent, else what the child reported.
 */
static pid_t fork_exec(struct child_spec *cs, struct child_error *ce)
{
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        *ce = (struct child_error){-1, errno, 0, -1};
        return -1;
    }
    cs->errfd = pfd[1];

    /* Block every signal across fork, so no handler runs in the child before the reset. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    /* no new stack: the child goes on, as after fork(), on a copy of ours */
    pid_t pid = cs->view ? (pid_t)syscall(SYS_clone, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS |
                                          SIGCHLD, NULL, NULL, NULL, 0L)
                         : fork();
    if (pid == 0)
        child_exec(cs);
    int fork_err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(pfd[1]);
    if (pid < 0) {
        close(pfd[0]);
        *ce = (struct child_error){-1, fork_err, 0, -1};
        return -1;
    }

    struct child_error msg;
    ssize_t n;
    do
        n = read(pfd[0], &msg, sizeof msg);
    while (n < 0 && errno == EINTR);
    close(pfd[0]);
    if (n == (ssize_t)sizeof msg) {             /* exec failed: reap the child, report */
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        *ce = msg;
        return -1;
    }
    return pid;                                 /* EOF: exec succeeded (CLOEXEC) */
}


/* Push `nil, err` for a failed fork_exec. */
static int push_spawn_error(lua_State *L, const struct child_spec *cs, const struct child_error *ce)
{
    char eb[128];
    const char *msg = forge_strerror(ce->err, eb, sizeof eb);
    const char *exe = cs->argv[0];
    switch (ce->stage) {
    case STAGE_EXEC:
        return forge_pusherror(L, "proc.exec", 0, "%s: %s", exe, msg);
    case STAGE_CHDIR:
        return forge_pusherror(L, "proc.exec", 0, "%s: chdir %s: %s", exe, cs->cwd, msg);
    case STAGE_SETUP:
        return forge_pusherror(L, "proc.exec", 0, "%s: child setup: %s", exe, msg);
    case STAGE_SETGROUPS: case STAGE_SETGID: case STAGE_SETUID: case STAGE_NO_NEW_PRIVS:
        return forge_pusherror(L, "proc.user", 0, "%s: cannot switch to user '%s': %s: %s", exe,
                               cs->user, user_steps[ce->stage - STAGE_SETGROUPS], msg);
    case STAGE_CGROUP:
        return forge_pusherror(L, "proc.limits", 0, "%s: joining %s: %s", exe, cs->cgroups[ce->index], msg);
    case STAGE_RLIMIT:
        return forge_pusherror(L, "proc.limits", 0, "%s: setrlimit(RLIMIT_NOFILE): %s", exe, msg);
    case STAGE_SETNS:
        return forge_pusherror(L, "proc.isolate", ce->err == ESRCH, "%s: entering the sandbox: %s", exe, msg);
    case STAGE_CAPS:
        return forge_pusherror(L, "proc.isolate", 0, "%s: dropping capabilities: %s", exe, msg);
    case STAGE_VIEW: {
        const char *path = ce->index >= 0 ? cs->view->hide[ce->index] :
                           ce->step >= VIEW_MKDIR && ce->step <= VIEW_BIND ? cs->view->writable : NULL;
        return forge_pusherror(L, "proc.isolate", 0, "%s: sandbox: %s%s%s: %s", exe, view_steps[ce->step],
                               path ? " " : "", path ? path : "", msg);
    }
    default:
        return forge_pusherror(L, "proc.spawn", ce->err == EAGAIN || ce->err == ENOMEM || ce->err == EMFILE ||
                               ce->err == ENFILE, "%s: fork: %s", exe, msg);
    }
}


/*
 * Read argv/env/cwd of the options table at `opt` into `cs` (fds untouched).
 * Strings that are not already held by the options table go into the anchor table at
 * `anchor`; the char* arrays are userdata pushed on the stack (left there, anchored).
 *
 * Stack: [... opt ... anchor ...] -> [... opt ... anchor ... argv_ud [envp_ud]]
 * May longjmp (usage errors, memory).
 */
static void read_command(lua_State *L, int opt, int anchor, struct child_spec *cs, const char *what)
{
    int na = 0;
    if (lua_getfield(L, opt, "argv") != LUA_TTABLE)
        luaL_error(L, "%s: option 'argv' must be a non-empty array of strings", what);
    int argv_t = lua_gettop(L);
    lua_Integer n = luaL_len(L, argv_t);
    if (n < 1 || n > 65536)
        luaL_error(L, "%s: option 'argv' must be a non-empty array of strings", what);
    char **argv = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof(char *), 0);
    for (lua_Integer i = 1; i <= n; i++) {
        int t = lua_geti(L, argv_t, i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "%s: argv[%d] must be a string", what, (int)i);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (strlen(s) != len)
            luaL_error(L, "%s: argv[%d] contains a NUL byte", what, (int)i);
        argv[i - 1] = (char *)s;
        lua_rawseti(L, anchor, ++na);           /* keep the (converted) string alive */
    }
    argv[n] = NULL;
    if (argv[0][0] == '\0')
        luaL_error(L, "%s: argv[1] must not be empty", what);
    lua_remove(L, argv_t);                      /* argv_ud stays */
    cs->argv = argv;

    cs->cwd = forge_optstrfield(L, opt, "cwd", NULL);

    const char *path = NULL;
    int te = lua_getfield(L, opt, "env");
    if (te == LUA_TNIL) {
        lua_pop(L, 1);
        cs->envp = NULL;
        path = getenv("PATH");
        if (path) {
            lua_pushstring(L, path);            /* copy: environ may change under us */
            path = lua_tostring(L, -1);
            lua_rawseti(L, anchor, ++na);
        }
    } else {
        if (te != LUA_TTABLE)
            luaL_error(L, "%s: option 'env' must be a table of strings", what);
        int env_t = lua_gettop(L);
        size_t count = 0;
        lua_pushnil(L);
        while (lua_next(L, env_t)) {
            count++;
            lua_pop(L, 1);
        }
        char **envp = lua_newuserdatauv(L, (count + 1) * sizeof(char *), 0);
        size_t k = 0;
        lua_pushnil(L);
        while (lua_next(L, env_t)) {
            /* stack: env_t envp_ud key value */
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "%s: env keys must be strings", what);
            int vt = lua_type(L, -1);
            if (vt != LUA_TSTRING && vt != LUA_TNUMBER)
                luaL_error(L, "%s: env value of '%s' must be a string", what, lua_tostring(L, -2));
            const char *key = lua_tostring(L, -2);
            if (key[0] == '\0' || strchr(key, '='))
                luaL_error(L, "%s: bad env name '%s'", what, key);
            lua_pushfstring(L, "%s=%s", key, lua_tostring(L, -1));
            envp[k++] = (char *)lua_tostring(L, -1);
            if (strcmp(key, "PATH") == 0)
                path = envp[k - 1] + 5;             /* after "PATH=" */
            lua_rawseti(L, anchor, ++na);
            lua_pop(L, 1);                      /* value; key stays for lua_next */
        }
        envp[k] = NULL;
        cs->envp = envp;
        lua_remove(L, env_t);                   /* envp_ud stays; value strings held by opt.env */
    }
    cs->path = path ? path : DEFAULT_PATH;
}


/* Open an output file for appending (created 0600). Returns fd or -errno. */
static int open_out(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0600);
    return fd < 0 ? -errno : fd;
}


/*
 * The options table at 1 of spawn/run: check its keys (`allowed`) and read its
 * command into a zeroed `cs`, anchoring strings in a new table at 2.
 *
 * Stack: [opts ...] -> [opts, anchor, argv_ud [envp_ud]]
 * May longjmp (usage errors, memory).
 */
static void check_command(lua_State *L, const char *what, const char *const allowed[],
                          struct child_spec *cs)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    forge_checkkeys(L, 1, what, allowed);
    lua_settop(L, 1);
    lua_newtable(L);                            /* 2: anchor */
    memset(cs, 0, sizeof *cs);
    cs->join_fd = -1;
    read_command(L, 1, 2, cs, what);
}


/*
 * The list of absolute paths on top of the stack as a NULL-terminated array, each path
 * followed by `suffix`; the array and the strings are anchored in the table at 2.
 * Stack: [opts, anchor, ... list] -> unchanged
 * May longjmp (usage errors, memory).
 */
static const char **read_paths(lua_State *L, const char *what, const char *field, const char *suffix)
{
    int t = lua_gettop(L);
    if (!lua_istable(L, t))
        luaL_error(L, "%s: option '%s' must be a list of absolute paths", what, field);
    lua_Integer n = luaL_len(L, t);
    if (n < 0 || n > 1024)
        luaL_error(L, "%s: option '%s' must list at most 1024 paths", what, field);
    const char **paths = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof *paths, 0);
    lua_rawseti(L, 2, (lua_Integer)lua_rawlen(L, 2) + 1);
    for (lua_Integer i = 1; i <= n; i++) {
        size_t len;
        const char *path = lua_geti(L, t, i) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        if (!path || path[0] != '/' || strlen(path) != len || len >= PATH_MAX)
            luaL_error(L, "%s: %s[%d] must be an absolute path", what, field, (int)i);
        paths[i - 1] = lua_pushfstring(L, "%s%s", path, suffix);
        lua_rawseti(L, 2, (lua_Integer)lua_rawlen(L, 2) + 1);
        lua_pop(L, 1);
    }
    paths[n] = NULL;
    return paths;
}


/*
 * The isolation options of the spawn/run options at 1 into `cs`: `cgroups` (directories to
 * join), `nofile` (open-file limit), `namespaces` = {writable=, hide={...}, hostname=} (into
 * `view`, which cs->view then points at).
 * Stack: [opts, anchor, ...] -> unchanged (buffers go into the anchor)
 * May longjmp (usage errors, memory).
 */
static void read_isolation(lua_State *L, struct child_spec *cs, struct ns_view *view, const char *what)
{
    static const char *const view_keys[] = {"writable", "hide", "hostname", NULL};
    if (lua_getfield(L, 1, "cgroups") != LUA_TNIL)
        cs->cgroups = read_paths(L, what, "cgroups", "/cgroup.procs");
    lua_pop(L, 1);
    lua_Integer nofile = forge_optintfield(L, 1, "nofile", 0);
    if (nofile < 0 || nofile > (1 << 30))
        luaL_error(L, "%s: option 'nofile' must be in 1..2^30", what);
    cs->nofile = (rlim_t)nofile;
    int t = lua_getfield(L, 1, "namespaces");
    if (t != LUA_TNIL) {
        if (t != LUA_TTABLE)
            luaL_error(L, "%s: option 'namespaces' must be a table", what);
        int v = lua_gettop(L);
        forge_checkkeys(L, v, "namespaces", view_keys);
        view->writable = forge_optstrfield(L, v, "writable", NULL);
        if (!view->writable || view->writable[0] != '/' || strlen(view->writable) >= PATH_MAX)
            luaL_error(L, "%s: namespaces.writable must be an absolute path", what);
        if (lua_getfield(L, v, "hide") == LUA_TNIL)
            lua_newtable(L);
        view->hide = read_paths(L, what, "namespaces.hide", "");
        lua_pop(L, 1);
        view->hostname = forge_optstrfield(L, v, "hostname", NULL);
        if (view->hostname && (view->hostname[0] == '\0' || strlen(view->hostname) > 64))
            luaL_error(L, "%s: namespaces.hostname must be 1..64 characters", what);
        cs->view = view;
    }
    lua_pop(L, 1);
}


/* ------------------------------------------------------------------------ */
/* users                                                                    */
/* ------------------------------------------------------------------------ */

/* A uid written as a string of decimal digits, or -1. */
static long long parse_uid(const char *s)
{
    if (*s == '\0' || strspn(s, "0123456789") != strlen(s) || strlen(s) > 10)
        return -1;
    long long v = strtoll(s, NULL, 10);
    return v < (long long)(uid_t)-1 ? v : -1;
}


/* The getpw*_r results that mean "no such user" (see getpwnam_r(3)). */
static int user_not_found(int rc)
{
    return rc == 0 || rc == ENOENT || rc == ESRCH || rc == EBADF || rc == EPERM;
}


/*
 * The passwd entry of `name` or, when there is no such name, of `uid` (-1: none).
 * Returns 0, ENOENT when neither exists, ERANGE when `buf` is too small, or an errno.
 */
static int find_passwd(const char *name, long long uid, struct passwd *pw, char *buf, size_t size)
{
    struct passwd *res = NULL;
    int rc = name ? getpwnam_r(name, pw, buf, size, &res) : 0;
    if (!res && user_not_found(rc) && uid >= 0)
        rc = getpwuid_r((uid_t)uid, pw, buf, size, &res);
    if (res)
        return 0;
    return user_not_found(rc) ? ENOENT : rc;
}


/*
 * Look up the user at `idx`: a name, or a uid (an integer, or a string of digits that
 * is not a user name). `what` names the caller in usage errors.
 * Found: returns 0 and fills *pw, whose strings live in a userdata.
 *   Stack: [...] -> [... pwbuf_ud]
 * Not found or lookup failed: returns 2 (for `return`), err code "proc.user".
 *   Stack: [...] -> [... nil, err]
 * May longjmp (a value that is neither a name nor a uid, memory).
 */
static int lookup_user(lua_State *L, int idx, const char *what, struct passwd *pw)
{
    const char *name = NULL;
    long long uid;
    char num[24];
    if (lua_type(L, idx) == LUA_TSTRING) {
        name = lua_tostring(L, idx);
        uid = parse_uid(name);
    } else {
        int isint = 0;
        lua_Integer v = lua_type(L, idx) == LUA_TNUMBER ? lua_tointegerx(L, idx, &isint) : -1;
        if (!isint || v < 0 || v >= (lua_Integer)(uid_t)-1)
            luaL_error(L, "%s: expected a user name or a uid (an integer >= 0)", what);
        uid = (long long)v;
        snprintf(num, sizeof num, "%lld", uid);
    }
    for (size_t size = 1024;; size *= 2) {
        char *buf = lua_newuserdatauv(L, size, 0);
        int rc = find_passwd(name, uid, pw, buf, size);
        if (rc == 0)
            return 0;
        lua_pop(L, 1);
        if (rc == ERANGE && size < (1u << 20))
            continue;
        const char *label = name ? name : num;
        if (rc == ENOENT)
            return forge_pusherror(L, "proc.user", 0, "no such user '%s'", label);
        char eb[128];
        return forge_pusherror(L, "proc.user", 1, "cannot look up user '%s': %s", label,
                               forge_strerror(rc, eb, sizeof eb));
    }
}


/*
 * The groups of `pw` (getgrouplist: its primary group included) in a new userdata;
 * *n gets their count.
 * Stack: [...] -> [... groups_ud]
 * May longjmp (memory).
 */
static gid_t *user_groups(lua_State *L, const struct passwd *pw, int *n)
{
    for (int cap = 32;;) {
        gid_t *groups = lua_newuserdatauv(L, (size_t)cap * sizeof *groups, 0);
        int want = cap;
        if (getgrouplist(pw->pw_name, pw->pw_gid, groups, &want) >= 0) {
            *n = want;
            return groups;
        }
        lua_pop(L, 1);
        cap = want > cap ? want : cap * 2;      /* want: the count getgrouplist needs */
    }
}


/*
 * The `user` option of the spawn/run options at 1, resolved in the parent (the child
 * may not call NSS) into `cs`. Absent, or already who we are: cs->user stays NULL.
 * `what` names the option in usage errors. Returns 0, or 2 with nil, err pushed ("proc.user").
 * Stack: [opts, anchor, ...] -> unchanged (buffers go into the anchor), or [... nil, err]
 * May longjmp (usage errors, memory).
 */
static int read_user(lua_State *L, struct child_spec *cs, const char *what)
{
    if (lua_getfield(L, 1, "user") == LUA_TNIL) {
        lua_pop(L, 1);
        return 0;
    }
    struct passwd pw;
    int rc = lookup_user(L, -1, what, &pw);     /* [... user, pwbuf_ud] */
    if (rc != 0)
        return rc;
    lua_rawseti(L, 2, (lua_Integer)lua_rawlen(L, 2) + 1);
    lua_pop(L, 1);                              /* user: held by opts */
    uid_t euid = geteuid();
    if (pw.pw_uid == euid)
        return 0;
    if (euid != 0)
        return forge_pusherror(L, "proc.user", 0, "cannot run as user '%s': the broker is not root", pw.pw_name);
    int n;
    cs->groups = user_groups(L, &pw, &n);       /* [... groups_ud] */
    lua_rawseti(L, 2, (lua_Integer)lua_rawlen(L, 2) + 1);
    cs->ngroups = (size_t)n;
    cs->user = pw.pw_name;
    cs->uid = pw.pw_uid;
    cs->gid = pw.pw_gid;
    return 0;
}


/* ------------------------------------------------------------------------ */
/* Lua API                                                                  */
/* ------------------------------------------------------------------------ */

/***
 * Start a long-running process in its own session and process group.
 * stdin is /dev/null, stdout/stderr are appended to the given files (created 0600,
 * default /dev/null; stderr defaults to the stdout file), every other fd is closed,
 * the signal mask and dispositions are reset. With `env` the child gets exactly that
 * environment (its PATH, if any, is also used to find argv[1]), else ours.
 * With `user` (a name or a uid) the child drops to that user's uid, primary gid and
 * groups, with no_new_privs, before chdir and exec (nothing changes when it is us);
 * the output files are still opened, and owned, by us.
 * Isolation (root only): `cgroups` lists cgroup directories the child joins before anything
 * else; `nofile` sets its open-file limit; `namespaces` = {writable=dir, hide={paths},
 * hostname=?} starts it as the first process of new mount, PID, IPC and UTS namespaces,
 * seeing the root tree read-only but for `writable`, a private /tmp and /dev/shm, each
 * `hide` path emptied and its own /proc, with no capability left (bounding set included)
 * and no_new_privs. Such a process ignores signals it has no handler for, but SIGKILL; when
 * it exits, the kernel kills whatever else runs in its namespaces.
 * @function spawn
 * @tparam table opts {argv={...}, cwd=?, env={K=V}?, stdout=path?, stderr=path?, user=?,
 *   cgroups={dir,...}?, nofile=?, namespaces={writable=, hide=?, hostname=?}?}
 * @return {pid=, start_time=} or nil, err (code "proc.exec" when exec/chdir failed,
 *   "proc.io" when an output file cannot be opened, "proc.spawn" when fork failed,
 *   "proc.user" for an unknown user, another user while we are not root, or a failed
 *   switch in the child, "proc.limits" when a cgroup or the open-file limit cannot be set,
 *   "proc.isolate" when the sandbox cannot be built (the step and path named))
 */
static int l_proc_spawn(lua_State *L)
{
    static const char *const keys[] = {"argv", "cwd", "env", "stdout", "stderr", "user", "cgroups", "nofile",
                                       "namespaces", NULL};
    struct child_spec cs;
    struct ns_view view;
    check_command(L, "proc.spawn", keys, &cs);     /* [opts, anchor, argv_ud [envp_ud]] */
    read_isolation(L, &cs, &view, "proc.spawn");
    const char *out_path = forge_optstrfield(L, 1, "stdout", NULL);
    const char *err_path = forge_optstrfield(L, 1, "stderr", NULL);
    int rc = read_user(L, &cs, "proc.spawn: option 'user'");
    if (rc != 0)
        return rc;

    /* No Lua call that can raise from here until every fd is closed. */
    char eb[128];
    int fd_in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd_in < 0)
        return forge_pusherror(L, "proc.io", 0, "/dev/null: %s", forge_strerror(errno, eb, sizeof eb));
    int fd_out = out_path ? open_out(out_path) : open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fd_out < 0) {
        int e = out_path ? -fd_out : errno;
        close(fd_in);
        return forge_pusherror(L, "proc.io", 0, "%s: %s", out_path ? out_path : "/dev/null",
                               forge_strerror(e, eb, sizeof eb));
    }
    int fd_err = fd_out;
    if (err_path && !(out_path && strcmp(err_path, out_path) == 0)) {
        fd_err = open_out(err_path);
        if (fd_err < 0) {
            close(fd_in);
            close(fd_out);
            return forge_pusherror(L, "proc.io", 0, "%s: %s", err_path, forge_strerror(-fd_err, eb, sizeof eb));
        }
    }
    cs.fd_in = fd_in;
    cs.fd_out = fd_out;
    cs.fd_err = fd_err;
    struct child_error ce;
    pid_t pid = fork_exec(&cs, &ce);
    close(fd_in);
    close(fd_out);
    if (fd_err != fd_out)
        close(fd_err);
    if (pid < 0)
        return push_spawn_error(L, &cs, &ce);

    struct proc_stat ps;
    rc = read_stat(pid, &ps);                   /* our child: even a zombie is still there */
    if (rc != 0)
        return forge_pusherror(L, "proc.spawn", 0, "%s: pid %d: reading start time: %s",
                               cs.argv[0], (int)pid, forge_strerror(-rc, eb, sizeof eb));
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, pid);
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, (lua_Integer)ps.start_time);
    lua_setfield(L, -2, "start_time");
    return 1;
}


/***
 * Start time of a live process (field 22 of /proc/<pid>/stat, in clock ticks since boot).
 * @function identity
 * @tparam integer pid
 * @return integer start time, or nil when there is no such process or it is a zombie
 */
static int l_proc_identity(lua_State *L)
{
    pid_t pid = check_pid(L, 1);
    struct proc_stat ps;
    if (read_stat(pid, &ps) != 0 || ps.state == 'Z' || ps.state == 'X' || ps.state == 'x') {
        lua_pushnil(L);
        return 1;
    }
    lua_pushinteger(L, (lua_Integer)ps.start_time);
    return 1;
}


/***
 * Whether the process pid exists, is not a zombie and has that start time.
 * An exited child of ours with that identity is reaped.
 * @function alive
 * @tparam integer pid
 * @tparam integer start_time
 * @treturn boolean
 */
static int l_proc_alive(lua_State *L)
{
    pid_t pid = check_pid(L, 1);
    lua_Integer st = luaL_checkinteger(L, 2);
    lua_pushboolean(L, check_alive(pid, (long long)st));
    return 1;
}


/***
 * Send a signal to the process with that identity: to its process group when it leads
 * one, else to the process alone.
 * @function kill
 * @tparam integer pid
 * @tparam integer start_time
 * @param sig name ("TERM", "KILL", "HUP", "INT", "USR1", "USR2", "QUIT", "STOP", "CONT",
 *   optionally "SIG"-prefixed, in any case) or number
 * @return true, or nil, err (code "proc.gone" when no live process has that identity)
 */
static int l_proc_kill(lua_State *L)
{
    pid_t pid = check_pid(L, 1);
    lua_Integer st = luaL_checkinteger(L, 2);
    int sig = check_signal(L, 3);
    int rc = signal_identity(pid, (long long)st, sig);
    if (rc == -ESRCH) {
        char stbuf[32];
        snprintf(stbuf, sizeof stbuf, "%lld", (long long)st);
        return forge_pusherror(L, "proc.gone", 0, "no process %d with start time %s", (int)pid, stbuf);
    }
    if (rc < 0) {
        char eb[128];
        return forge_pusherror(L, "proc.kill", 0, "kill %d: %s", (int)pid, forge_strerror(-rc, eb, sizeof eb));
    }
    lua_pushboolean(L, 1);
    return 1;
}


/***
 * The number of a signal, to validate one early (e.g. a script's stop_signal).
 * @function signal_number
 * @param sig name (as for kill) or number
 * @return integer, or nil for an unknown name or a number outside 1..NSIG-1
 */
static int l_proc_signal_number(lua_State *L)
{
    int sig = -1;
    if (lua_type(L, 1) == LUA_TNUMBER) {
        lua_Integer s = luaL_checkinteger(L, 1);
        if (s > 0 && s < NSIG)
            sig = (int)s;
    } else {
        sig = signal_by_name(luaL_checkstring(L, 1));
    }
    if (sig < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, sig);
    return 1;
}


/***
 * Stop a process: the signal (default SIGTERM) to its group, poll every 25 ms (reaping
 * it when it is our child), SIGKILL after `timeout` seconds — at once when the process is the
 * first of a PID namespace and leaves the signal at its default action, as the kernel then
 * drops it — then wait (at most 5 s more) until it is gone.
 * @function stop
 * @tparam integer pid
 * @tparam integer start_time
 * @tparam[opt=10] number timeout seconds before SIGKILL
 * @param[opt="TERM"] sig name (as for kill) or number, not 0
 * @return true (also when it was already gone), or nil, err ("proc.stop", retryable)
 */
/*
 * Would `sig` stop `pid` if the kernel delivered it? The first process of a PID namespace
 * (its NSpid ends in 1) gets no signal it does not catch, so a stop signal it leaves at its
 * default action (terminate) is dropped; only SIGKILL ends it. 1 for such a process and signal,
 * else 0 (it catches or ignores the signal, is no namespace's first process, or is gone).
 */
static int dropped_default_stop(pid_t pid, int sig)
{
    static const int terminating[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGPIPE};
    int terminates = 0;
    for (size_t i = 0; i < sizeof terminating / sizeof terminating[0]; i++)
        terminates |= terminating[i] == sig;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = terminates ? fopen(path, "re") : NULL;
    if (!f)
        return 0;
    int ns_first = 0;
    unsigned long long caught = 0, ignored = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "NSpid:", 6) == 0) {
            char *last = strrchr(line, '\t');
            ns_first = last && last != strchr(line, '\t') && strtol(last + 1, NULL, 10) == 1;
        }
        sscanf(line, "SigCgt: %llx", &caught);
        sscanf(line, "SigIgn: %llx", &ignored);
    }
    fclose(f);
    unsigned long long bit = 1ULL << (sig - 1);
    return ns_first && !(caught & bit) && !(ignored & bit);
}

static int l_proc_stop(lua_State *L)
{
    pid_t pid = check_pid(L, 1);
    long long st = (long long)luaL_checkinteger(L, 2);
    double timeout = luaL_optnumber(L, 3, 10);
    luaL_argcheck(L, timeout >= 0, 3, "timeout must be >= 0");
    int sig = lua_isnoneornil(L, 4) ? SIGTERM : check_signal(L, 4);
    luaL_argcheck(L, sig != 0, 4, "signal 0 stops nothing");
    char eb[128];

    int rc = signal_identity(pid, st, sig);
    if (rc == -ESRCH) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (rc < 0)
        return forge_pusherror(L, "proc.stop", 0, "kill %d: %s", (int)pid, forge_strerror(-rc, eb, sizeof eb));
    /* a signal the kernel drops is not waited for: SIGKILL now does what it would have done */
    double deadline = now_mono() + (dropped_default_stop(pid, sig) ? 0 : timeout);
    for (;;) {
        if (!check_alive(pid, st)) {
            lua_pushboolean(L, 1);
            return 1;
        }
        double left = deadline - now_mono();
        if (left <= 0)
            break;
        sleep_s(left < POLL_INTERVAL_NS / 1e9 ? left : POLL_INTERVAL_NS / 1e9);
    }
    rc = signal_identity(pid, st, SIGKILL);
    if (rc < 0 && rc != -ESRCH)
        return forge_pusherror(L, "proc.stop", 0, "kill %d: %s", (int)pid, forge_strerror(-rc, eb, sizeof eb));
    deadline = now_mono() + STOP_KILL_WAIT_S;
    while (check_alive(pid, st)) {
        if (now_mono() > deadline)
            return forge_pusherror(L, "proc.stop", 1, "pid %d still alive %f s after SIGKILL",
                                   (int)pid, STOP_KILL_WAIT_S);
        sleep_s(POLL_INTERVAL_NS / 1e9);
    }
    lua_pushboolean(L, 1);
    return 1;
}


/***
 * Wait for our child to exit and reap it.
 * @function wait
 * @tparam integer pid a child of this process
 * @tparam[opt] number timeout seconds; absent waits for ever, 0 polls once
 * @return {code=, signal=} (code when it exited, signal when killed), nil when still
 *   running after the timeout, or nil, err ("proc.not_child")
 */
static int l_proc_wait(lua_State *L)
{
    pid_t pid = check_pid(L, 1);
    int forever = lua_isnoneornil(L, 2);
    double timeout = forever ? 0 : luaL_checknumber(L, 2);
    luaL_argcheck(L, timeout >= 0, 2, "timeout must be >= 0");
    double deadline = now_mono() + timeout;
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, forever ? 0 : WNOHANG);
        if (r == pid) {
            push_status(L, status);
            return 1;
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            char eb[128];
            int e = errno;
            return forge_pusherror(L, e == ECHILD ? "proc.not_child" : "proc.wait", 0, "waitpid %d: %s",
                                   (int)pid, forge_strerror(e, eb, sizeof eb));
        }
        double left = deadline - now_mono();
        if (left <= 0) {
            lua_pushnil(L);
            return 1;
        }
        sleep_s(left < POLL_INTERVAL_NS / 1e9 ? left : POLL_INTERVAL_NS / 1e9);
    }
}


/* ------------------------------------------------------------------------ */
/* proc.run                                                                 */
/* ------------------------------------------------------------------------ */

/*
 * State of one run(), owned by a full userdata so that every fd, buffer and the child
 * are released by __gc even if a Lua call raises (memory error) mid-way.
 */
struct run_ctx {
    pid_t pid;                  /* 0 once reaped (or never started) */
    int in_fd, pidfd;
    int join_fd;                /* pidfd of the process to join, until the fork */
    int out_fd[2];              /* stdout, stderr read ends */
    char *buf[2];
    size_t len[2], cap[2];
};


static void run_kill_group(struct run_ctx *rc)
{
    if (rc->pid > 0) {
        kill(-rc->pid, SIGKILL);                /* the group (setsid in the child) ... */
        kill(rc->pid, SIGKILL);                 /* ... and the child, if not yet leader */
    }
}


static void run_close(struct run_ctx *rc)
{
    if (rc->in_fd >= 0)
        close(rc->in_fd);
    if (rc->pidfd >= 0)
        close(rc->pidfd);
    if (rc->join_fd >= 0)
        close(rc->join_fd);
    for (int i = 0; i < 2; i++)
        if (rc->out_fd[i] >= 0)
            close(rc->out_fd[i]);
    rc->in_fd = rc->pidfd = rc->join_fd = rc->out_fd[0] = rc->out_fd[1] = -1;
}


/* __gc: close fds, kill and reap a child still running, free the buffers. */
static int l_run_gc(lua_State *L)
{
    struct run_ctx *rc = luaL_checkudata(L, 1, PROC_RUN_MT);
    run_close(rc);
    if (rc->pid > 0) {
        run_kill_group(rc);
        while (waitpid(rc->pid, NULL, 0) < 0 && errno == EINTR)
            ;
        rc->pid = 0;
    }
    for (int i = 0; i < 2; i++) {
        free(rc->buf[i]);
        rc->buf[i] = NULL;
    }
    return 0;
}


/* Append n bytes to output i. Returns 0, or -ENOMEM. */
static int run_append(struct run_ctx *rc, int i, const char *data, size_t n)
{
    if (rc->len[i] + n > rc->cap[i]) {
        size_t cap = rc->cap[i] ? rc->cap[i] : 4096;
        while (cap < rc->len[i] + n)
            cap *= 2;
        char *b = realloc(rc->buf[i], cap);
        if (!b)
            return -ENOMEM;
        rc->buf[i] = b;
        rc->cap[i] = cap;
    }
    memcpy(rc->buf[i] + rc->len[i], data, n);
    rc->len[i] += n;
    return 0;
}


/* Make a pipe (both ends CLOEXEC); the parent's end non-blocking. */
static int make_pipe(int p[2], int parent_end)
{
    if (pipe2(p, O_CLOEXEC) < 0)
        return -errno;
    fcntl(p[parent_end], F_SETFL, fcntl(p[parent_end], F_GETFL) | O_NONBLOCK);
    return 0;
}


/***
 * Run a helper command to completion, feeding stdin and capturing stdout and stderr.
 * The command runs in its own process group, which is SIGKILLed on timeout; only the
 * command's own pid is reaped. `cgroups`, `nofile` and `namespaces` as for spawn; or
 * `join` = {pid=, start_time=}: the command runs inside the namespaces of that process
 * (a member of its PID namespace; the child we wait for stays outside and exits as the
 * command did), with no capability left and no_new_privs.
 * @function run
 * @tparam table opts {argv={...}, stdin=string?, env={K=V}?, cwd=?, timeout=seconds
 *   (default 10), max_output=bytes per stream (default 1 MiB), user=? (as for spawn),
 *   cgroups=?, nofile=?, namespaces=? (as for spawn), join={pid=, start_time=}?}
 * @return {code=, signal=, stdout=, stderr=}, or nil, err ("proc.exec",
 *   "proc.timeout" (retryable), "proc.output" when an output exceeds max_output, "proc.io",
 *   "proc.user", "proc.limits", "proc.isolate" as for spawn, "proc.gone" (retryable) when
 *   the process to join is not alive)
 */
static int l_proc_run(lua_State *L)
{
    static const char *const keys[] = {"argv", "stdin", "env", "cwd", "timeout", "max_output", "user", "cgroups",
                                       "nofile", "namespaces", "join", NULL};
    struct child_spec cs;
    struct ns_view view;
    check_command(L, "proc.run", keys, &cs);     /* [opts, anchor, argv_ud [envp_ud]] */
    read_isolation(L, &cs, &view, "proc.run");
    cs.short_lived = 1;
    lua_Integer join_pid = 0, join_start = -1;
    if (lua_getfield(L, 1, "join") != LUA_TNIL) {
        if (!lua_istable(L, -1) || cs.view)
            luaL_error(L, "proc.run: option 'join' must be {pid=, start_time=}, without 'namespaces'");
        join_pid = forge_optintfield(L, -1, "pid", 0);
        join_start = forge_optintfield(L, -1, "start_time", -1);
        if (join_pid <= 1 || join_pid > INT_MAX || join_start < 0)
            luaL_error(L, "proc.run: option 'join' must be {pid=, start_time=}, without 'namespaces'");
    }
    lua_pop(L, 1);
    double timeout = forge_optnumfield(L, 1, "timeout", 10);
    if (!(timeout > 0))
        luaL_error(L, "proc.run: option 'timeout' must be > 0");
    lua_Integer max_output = forge_optintfield(L, 1, "max_output", 1 << 20);
    if (max_output < 0)
        luaL_error(L, "proc.run: option 'max_output' must be >= 0");
    size_t in_len = 0;
    const char *in_data = NULL;
    lua_getfield(L, 1, "stdin");
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "proc.run: option 'stdin' must be a string");
        in_data = lua_tolstring(L, -1, &in_len);
    }
    lua_pop(L, 1);                              /* still held by opts */
    int user_rc = read_user(L, &cs, "proc.run: option 'user'");
    if (user_rc != 0)
        return user_rc;

    struct run_ctx *rc = lua_newuserdatauv(L, sizeof *rc, 0);
    memset(rc, 0, sizeof *rc);
    rc->in_fd = rc->pidfd = rc->join_fd = rc->out_fd[0] = rc->out_fd[1] = -1;
    if (luaL_newmetatable(L, PROC_RUN_MT)) {
        lua_pushcfunction(L, l_run_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    int ctx_idx = lua_gettop(L);

    /* From here to the result, only rc owns resources; nothing below raises before
     * the final pushes, and those are covered by __gc. */
    char eb[128];
    if (join_pid && (rc->join_fd = pidfd_of_identity((pid_t)join_pid, (long long)join_start)) < 0) {
        char stbuf[32];
        snprintf(stbuf, sizeof stbuf, "%lld", (long long)join_start);
        return forge_pusherror(L, "proc.gone", 1, "%s: no process %d with start time %s to join", cs.argv[0],
                               (int)join_pid, stbuf);
    }
    cs.join_fd = rc->join_fd;
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1};
    int e = 0;
    if (in_data)
        e = make_pipe(pin, 1);
    else if ((pin[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        e = -errno;
    if (e == 0)
        e = make_pipe(pout, 0);
    if (e == 0)
        e = make_pipe(perr, 0);
    if (e < 0) {
        int fds[] = {pin[0], pin[1], pout[0], pout[1], perr[0], perr[1]};
        for (int i = 0; i < 6; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        return forge_pusherror(L, "proc.io", 1, "pipe: %s", forge_strerror(-e, eb, sizeof eb));
    }
    rc->in_fd = pin[1];
    rc->out_fd[0] = pout[0];
    rc->out_fd[1] = perr[0];
    cs.fd_in = pin[0];
    cs.fd_out = pout[1];
    cs.fd_err = perr[1];
    struct child_error ce;
    pid_t pid = fork_exec(&cs, &ce);
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    if (rc->join_fd >= 0) {
        close(rc->join_fd);
        rc->join_fd = -1;
    }
    if (pid < 0) {
        run_close(rc);
        return push_spawn_error(L, &cs, &ce);
    }
    rc->pid = pid;
    rc->pidfd = pidfd_open_(pid);               /* readable once the child exits */
    if (in_data && in_len == 0) {
        close(rc->in_fd);
        rc->in_fd = -1;
    }

    /* SIGPIPE stays blocked while we feed stdin; one we raise is consumed below. */
    sigset_t pipeset, oldmask, pending;
    sigemptyset(&pipeset);
    sigaddset(&pipeset, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipeset, &oldmask);
    sigpending(&pending);
    int pipe_was_pending = sigismember(&pending, SIGPIPE);
    int got_epipe = 0;

    size_t in_off = 0;
    int status = 0, reaped = 0, failure = 0;    /* failure: 1 timeout, 2 output limit, 3 io */
    int fail_errno = 0;
    double deadline = now_mono() + timeout;
    char chunk[16384];
    for (;;) {
        if (!reaped) {
            pid_t r = waitpid(pid, &status, WNOHANG);
            if (r == pid) {
                reaped = 1;
                rc->pid = 0;
                if (rc->pidfd >= 0) {
                    close(rc->pidfd);
                    rc->pidfd = -1;
                }
            }
        }
        if (reaped && rc->out_fd[0] < 0 && rc->out_fd[1] < 0)
            break;
        double left = deadline - now_mono();
        if (left <= 0) {
            if (!reaped)
                failure = 1;
            break;                              /* reaped: leftovers hold the pipes; stop */
        }
        int wait_ms = (int)(left * 1000) + 1;
        if (reaped && wait_ms > RUN_GRACE_MS)
            wait_ms = RUN_GRACE_MS;
        else if (!reaped && rc->pidfd < 0 && wait_ms > 20)
            wait_ms = 20;                       /* no pidfd: poll waitpid */

        struct pollfd pf[4];
        int np = 0, ix_in = -1, ix_out[2] = {-1, -1};
        if (rc->in_fd >= 0) {
            pf[np] = (struct pollfd){.fd = rc->in_fd, .events = POLLOUT};
            ix_in = np++;
        }
        for (int i = 0; i < 2; i++)
            if (rc->out_fd[i] >= 0) {
                pf[np] = (struct pollfd){.fd = rc->out_fd[i], .events = POLLIN};
                ix_out[i] = np++;
            }
        if (!reaped && rc->pidfd >= 0)
            pf[np++] = (struct pollfd){.fd = rc->pidfd, .events = POLLIN};
        int nr = poll(pf, (nfds_t)np, wait_ms);
        if (nr < 0) {
            if (errno == EINTR)
                continue;
            failure = 3;
            fail_errno = errno;
            break;
        }
        if (nr == 0 && reaped)
            break;                              /* exited and output idle: done */
        if (ix_in >= 0 && pf[ix_in].revents) {
            ssize_t w = write(rc->in_fd, in_data + in_off, in_len - in_off);
            if (w > 0)
                in_off += (size_t)w;
            else if (w < 0 && errno == EPIPE)
                got_epipe = 1;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || in_off == in_len ||
                (pf[ix_in].revents & (POLLERR | POLLHUP))) {
                close(rc->in_fd);               /* done, or the child closed its stdin */
                rc->in_fd = -1;
            }
        }
        for (int i = 0; i < 2 && !failure; i++) {
            if (ix_out[i] < 0 || !pf[ix_out[i]].revents)
                continue;
            ssize_t r = read(rc->out_fd[i], chunk, sizeof chunk);
            if (r > 0) {
                if (rc->len[i] + (size_t)r > (size_t)max_output) {
                    failure = 2;
                    fail_errno = i;
                } else if (run_append(rc, i, chunk, (size_t)r) < 0) {
                    failure = 3;
                    fail_errno = ENOMEM;
                }
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(rc->out_fd[i]);
                rc->out_fd[i] = -1;
            }
        }
        if (failure)
            break;
    }

    if (got_epipe && !pipe_was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipeset, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    pthread_sigmask(SIG_SETMASK, &oldmask, NULL);

    run_close(rc);
    if (failure) {
        if (!reaped) {
            run_kill_group(rc);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            rc->pid = 0;
        }
        if (failure == 1)
            return forge_pusherror(L, "proc.timeout", 1, "%s: timed out after %f s", cs.argv[0], timeout);
        if (failure == 2) {
            char nb[32];
            snprintf(nb, sizeof nb, "%lld", (long long)max_output);
            return forge_pusherror(L, "proc.output", 0, "%s: %s exceeds %s bytes", cs.argv[0],
                                   fail_errno ? "stderr" : "stdout", nb);
        }
        return forge_pusherror(L, "proc.io", 1, "%s: %s", cs.argv[0], forge_strerror(fail_errno, eb, sizeof eb));
    }
    push_status(L, status);
    lua_pushlstring(L, rc->buf[0] ? rc->buf[0] : "", rc->len[0]);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, rc->buf[1] ? rc->buf[1] : "", rc->len[1]);
    lua_setfield(L, -2, "stderr");
    lua_pushnil(L);                             /* release the buffers now, not at next GC */
    lua_setmetatable(L, ctx_idx);
    for (int i = 0; i < 2; i++) {
        free(rc->buf[i]);
        rc->buf[i] = NULL;
    }
    return 1;
}


/* The child of can_isolate(): the first steps of a view, then exit. */
static FORGE_NORETURN void probe_view(int errfd)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        view_fail(errfd, VIEW_PRIVATE, -1);
    int root = open_tree(AT_FDCWD, "/", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (root < 0)
        view_fail(errfd, VIEW_TREE, -1);
    struct mount_attr ro = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, .propagation = MS_PRIVATE};
    if (mount_setattr(root, "", AT_EMPTY_PATH | AT_RECURSIVE, &ro, sizeof ro) < 0)
        view_fail(errfd, VIEW_RDONLY, -1);
    _exit(0);
}


/***
 * Whether spawn/run can start sandboxes here (option `namespaces`): we are root, and the
 * kernel gives a child new mount, PID, IPC and UTS namespaces and has the mount API the view
 * is built with (open_tree, mount_setattr: Linux 5.12).
 * @function can_isolate
 * @return true, or false, message (what is missing)
 */
static int l_proc_can_isolate(lua_State *L)
{
    char eb[128];
    lua_pushboolean(L, 0);
    if (geteuid() != 0) {
        lua_pushliteral(L, "the broker does not run as root");
        return 2;
    }
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        lua_pushfstring(L, "pipe: %s", forge_strerror(errno, eb, sizeof eb));
        return 2;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD,
                               NULL, NULL, NULL, 0L);
    if (pid == 0)
        probe_view(pfd[1]);
    int clone_err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(pfd[1]);
    struct child_error ce;
    ssize_t n = 0;
    if (pid > 0) {
        do
            n = read(pfd[0], &ce, sizeof ce);
        while (n < 0 && errno == EINTR);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    close(pfd[0]);
    if (pid < 0)
        lua_pushfstring(L, "new namespaces: %s", forge_strerror(clone_err, eb, sizeof eb));
    else if (n == (ssize_t)sizeof ce)
        lua_pushfstring(L, "%s: %s", view_steps[ce.step], forge_strerror(ce.err, eb, sizeof eb));
    else
        lua_pushboolean(L, 1);
    return lua_isboolean(L, -1) ? 1 : 2;
}


/* ------------------------------------------------------------------------ */
/* time                                                                     */
/* ------------------------------------------------------------------------ */

/***
 * Sleep (fractional seconds; resumes after signals).
 * @function sleep
 * @tparam number seconds
 */
static int l_proc_sleep(lua_State *L)
{
    double s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s >= 0 && s < 1e9, 1, "seconds must be in [0, 1e9)");
    sleep_s(s);
    return 0;
}


/***
 * Monotonic clock.
 * @function monotonic
 * @treturn number seconds (CLOCK_MONOTONIC)
 */
static int l_proc_monotonic(lua_State *L)
{
    lua_pushnumber(L, now_mono());
    return 1;
}


/***
 * Wall clock.
 * @function time
 * @treturn number seconds since the epoch, fractional
 */
static int l_proc_time(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}


/***
 * Hand the heap's free memory back to the kernel (malloc_trim over every arena). glibc keeps
 * what a burst of work freed, per thread arena, until then; the broker calls this when it
 * turns idle.
 * @function trim_heap
 * @treturn boolean whether any memory was released
 */
static int l_proc_trim_heap(lua_State *L)
{
    lua_pushboolean(L, malloc_trim(0));
    return 1;
}


/***
 * Our own pid.
 * @function getpid
 * @treturn integer
 */
static int l_proc_getpid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}


/* ------------------------------------------------------------------------ */
/* users and ownership                                                      */
/* ------------------------------------------------------------------------ */

/***
 * Look up a user.
 * @function user
 * @param user a name, or a uid (an integer, or a string of digits that is not a name)
 * @return {name=, uid=, gid=, home=}, or nil, err (code "proc.user": no such user, or
 *   the lookup failed (retryable))
 */
static int l_proc_user(lua_State *L)
{
    luaL_checkany(L, 1);
    struct passwd pw;
    int rc = lookup_user(L, 1, "proc.user", &pw);   /* [user, pwbuf_ud] */
    if (rc != 0)
        return rc;
    lua_createtable(L, 0, 4);
    lua_pushstring(L, pw.pw_name);
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, (lua_Integer)pw.pw_uid);
    lua_setfield(L, -2, "uid");
    lua_pushinteger(L, (lua_Integer)pw.pw_gid);
    lua_setfield(L, -2, "gid");
    lua_pushstring(L, pw.pw_dir);
    lua_setfield(L, -2, "home");
    return 1;
}


/***
 * Our effective uid (0: the broker is root).
 * @function geteuid
 * @treturn integer
 */
static int l_proc_geteuid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)geteuid());
    return 1;
}


/* One chown(), possibly recursive; `path` names the entry at hand. */
struct chown_walk {
    uid_t uid;
    gid_t gid;
    int recursive;
    char path[PATH_MAX];
};

static int chown_entry(struct chown_walk *w, int dirfd, const char *name, size_t len);


/* fchown the directory `fd`, then every entry in it. Closes fd. Returns 0 or -errno. */
static int chown_dir(struct chown_walk *w, int fd, size_t len)
{
    if (fchown(fd, w->uid, w->gid) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return -e;
    }
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            rc = -errno;
            break;
        }
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        size_t n = strlen(de->d_name);
        if (len + 1 + n >= sizeof w->path) {
            rc = -ENAMETOOLONG;
            break;
        }
        w->path[len] = '/';
        memcpy(w->path + len + 1, de->d_name, n + 1);
        rc = chown_entry(w, dirfd(d), de->d_name, len + 1 + n);
        if (rc < 0)
            break;
        w->path[len] = '\0';
    }
    closedir(d);
    return rc;
}


/*
 * Chown `name` in `dirfd` (w->path, of length len), never following a symlink; when
 * recursive, a directory (not a symlink to one) with everything below it. Returns 0 or
 * -errno, w->path then naming the entry that failed.
 */
static int chown_entry(struct chown_walk *w, int dirfd, const char *name, size_t len)
{
    if (w->recursive) {
        int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0)
            return chown_dir(w, fd, len);
        if (errno != ENOTDIR && errno != ELOOP)     /* ELOOP: a symlink */
            return -errno;
    }
    return fchownat(dirfd, name, w->uid, w->gid, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}


/***
 * Give a file to a user: owner its uid, group its primary gid. A symlink is changed
 * itself, never its target; the recursive walk does not enter symlinked directories.
 * @function chown
 * @tparam string path
 * @param user a name or a uid (as for proc.user)
 * @tparam[opt=false] boolean recursive
 * @return true, or nil, err ("proc.user" as for proc.user, "proc.chown" naming the path)
 */
static int l_proc_chown(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    luaL_argcheck(L, len > 0 && strlen(path) == len, 1, "path must be non-empty, without NUL bytes");
    luaL_checkany(L, 2);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TBOOLEAN);
    struct chown_walk w;
    w.recursive = lua_toboolean(L, 3);
    struct passwd pw;
    int rc = lookup_user(L, 2, "proc.chown", &pw);
    if (rc != 0)
        return rc;
    w.uid = pw.pw_uid;
    w.gid = pw.pw_gid;
    char eb[128];
    if (len >= sizeof w.path)
        return forge_pusherror(L, "proc.chown", 0, "chown %s: %s", path, forge_strerror(ENAMETOOLONG, eb, sizeof eb));
    memcpy(w.path, path, len + 1);
    rc = chown_entry(&w, AT_FDCWD, path, len);
    if (rc < 0)
        return forge_pusherror(L, "proc.chown", 0, "chown %s: %s", w.path, forge_strerror(-rc, eb, sizeof eb));
    lua_pushboolean(L, 1);
    return 1;
}


/***
 * Set the permission bits of a file or directory, never following a symlink (lfs has no chmod).
 * @function chmod
 * @tparam string path
 * @tparam integer mode 0..07777
 * @return true | nil, err (code "proc.chmod")
 */
static int l_proc_chmod(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    luaL_argcheck(L, len > 0 && strlen(path) == len, 1, "path must be non-empty, without NUL bytes");
    lua_Integer mode = luaL_checkinteger(L, 2);
    luaL_argcheck(L, mode >= 0 && mode <= 07777, 2, "mode must be in 0..07777");
    char eb[128];
    /* glibc refuses a symlink itself here (EOPNOTSUPP) and never follows one: no lstat race */
    if (fchmodat(AT_FDCWD, path, (mode_t)mode, AT_SYMLINK_NOFOLLOW) != 0)
        return forge_pusherror(L, "proc.chmod", 0, "chmod %s: %s", path,
                               errno == EOPNOTSUPP ? "is a symbolic link" : forge_strerror(errno, eb, sizeof eb));
    lua_pushboolean(L, 1);
    return 1;
}


/* ------------------------------------------------------------------------ */
/* network probes                                                           */
/* ------------------------------------------------------------------------ */

static int check_port(lua_State *L, int idx)
{
    lua_Integer port = luaL_checkinteger(L, idx);
    luaL_argcheck(L, port >= 1 && port <= 65535, idx, "port must be in 1..65535");
    return (int)port;
}


/***
 * Whether a TCP port can be bound (bind test with SO_REUSEADDR; the socket is closed
 * at once).
 * @function port_free
 * @tparam integer port
 * @tparam[opt="127.0.0.1"] string host a numeric address or a name
 * @return true when free, false when in use, or nil, err ("proc.net") when the test
 *   itself fails (unresolvable host, address not local, permission)
 */
static int l_proc_port_free(lua_State *L)
{
    int port = check_port(L, 1);
    const char *host = luaL_optstring(L, 2, "127.0.0.1");
    char serv[8], eb[128];
    snprintf(serv, sizeof serv, "%d", port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    int g = getaddrinfo(host, serv, &hints, &res);
    if (g != 0)
        return forge_pusherror(L, "proc.net", 0, "%s: %s", host, gai_strerror(g));
    int result = -1, last = 0;
    for (struct addrinfo *ai = res; ai && result < 0; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            last = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            result = 1;
        else if (errno == EADDRINUSE)
            result = 0;
        else
            last = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (result < 0)
        return forge_pusherror(L, "proc.net", 0, "%s:%d: %s", host, port, forge_strerror(last, eb, sizeof eb));
    lua_pushboolean(L, result);
    return 1;
}


/***
 * Whether a TCP connection to host:port succeeds within the timeout.
 * @function tcp_check
 * @tparam string host
 * @tparam integer port
 * @tparam[opt=1] number timeout seconds (shared by every address of host)
 * @return true, or false, err ("proc.net": refused, timed out, unresolvable)
 */
static int l_proc_tcp_check(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    int port = check_port(L, 2);
    double timeout = luaL_optnumber(L, 3, 1);
    luaL_argcheck(L, timeout >= 0 && timeout < 86400, 3, "timeout must be in [0, 86400)");
    char eb[128];
    int gai;
    int rc = forge_tcp_connect(host, port, (int)(timeout * 1000), &gai);
    if (gai != 0) {
        lua_pushboolean(L, 0);
        forge_newerror(L, "proc.net", 0, "%s: %s", host, gai_strerror(gai));
        return 2;
    }
    if (rc >= 0) {
        close(rc);
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushboolean(L, 0);
    forge_newerror(L, "proc.net", rc == -ETIMEDOUT, "%s:%d: %s", host, port, forge_strerror(-rc, eb, sizeof eb));
    return 2;
}


int luaopen_forge_proc(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"spawn", l_proc_spawn},
        {"identity", l_proc_identity},
        {"alive", l_proc_alive},
        {"kill", l_proc_kill},
        {"signal_number", l_proc_signal_number},
        {"stop", l_proc_stop},
        {"wait", l_proc_wait},
        {"run", l_proc_run},
        {"can_isolate", l_proc_can_isolate},
        {"sleep", l_proc_sleep},
        {"monotonic", l_proc_monotonic},
        {"time", l_proc_time},
        {"getpid", l_proc_getpid},
        {"trim_heap", l_proc_trim_heap},
        {"geteuid", l_proc_geteuid},
        {"user", l_proc_user},
        {"chown", l_proc_chown},
        {"chmod", l_proc_chmod},
        {"port_free", l_proc_port_free},
        {"tcp_check", l_proc_tcp_check},
        {NULL, NULL},
    };
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.proc");
    return 1;
}
